"""Every tutorial runs end to end in smoke mode (``CI`` set), as Pyro/NumPyro run theirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parents[1] / "tutorials").glob("*.py"))


@pytest.mark.e2e
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_runs_in_smoke_mode(path: Path, tmp_path: Path) -> None:
    env = {**os.environ, "CI": "true", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_there_is_a_tutorial() -> None:
    assert TUTORIALS, "tutorials/ has no tutorial"
