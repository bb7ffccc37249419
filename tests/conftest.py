"""Test configuration: float64 for accuracy on both backends, fixed seeds."""

from __future__ import annotations

from collections.abc import Iterator

import numpyro
import pytest

numpyro.enable_x64()


@pytest.fixture(scope="module")
def torch_float64_one_thread() -> Iterator[None]:
    """float64 for torch too, and one intra-op thread, for a module's Pyro tests.

    float64 on both backends (NumPyro's is enabled above); the Pyro runners convert
    NumPy data to torch's default dtype. One thread: the test models are tiny, and
    on a shared 2-core machine a second OpenMP thread makes small linear algebra (a
    3x3 Cholesky) hundreds of times slower. Use it with
    ``pytestmark = pytest.mark.usefixtures("torch_float64_one_thread")``.
    """
    torch = pytest.importorskip("torch")
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
