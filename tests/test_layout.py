"""The layout shows the architecture, and stays that way.

* the core, the diagnostics and the neutral halves of engines and primitives import no
  backend, neither at import time (a fresh interpreter) nor inside any function
  (every import statement in their source);
* the core reaches a backend only through the registry of backend services, which is
  open to a third backend (registered here, fitted and predicted through `probdyn.fit`);
* the two backend folders do not copy each other (`tools/twin_lines.py`);
* no module is over 500 lines without its docstring saying why.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import probdyn
from probdyn.core import Backend, register_backend

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "probdyn"
NEUTRAL = ("core", "diagnostics", "engines", "primitives", "data")
BACKEND_MODULES = (
    "jax",
    "jaxlib",
    "numpyro",
    "equinox",
    "diffrax",
    "optax",
    "blackjax",
    "torch",
    "pyro",
    "torchdiffeq",
    "torchsde",
    "probdyn.numpyro",
    "probdyn.pyro",
    "probdyn.demo",
)
MAX_LINES = 500
MAX_TWIN_LINES = 100


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an ``import`` statement in ``path`` names, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            # ``from probdyn import numpyro`` names the backend in the alias
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def _is_backend(module: str) -> bool:
    return any(module == b or module.startswith(b + ".") for b in BACKEND_MODULES)


@pytest.mark.parametrize("folder", NEUTRAL)
def test_neutral_folders_import_no_backend_anywhere(folder: str) -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((PACKAGE / folder).rglob("*.py"))
        for line, module in _imports(path)
        if _is_backend(module)
    ]
    assert not offenders, "\n".join(offenders)


def test_the_static_check_would_catch_a_lazy_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from probdyn.pyro.bridge import isolated\n    import jax\n")
    assert [m for _, m in _imports(source) if _is_backend(m)] == [
        "probdyn.pyro.bridge",
        "probdyn.pyro.bridge.isolated",
        "jax",
    ]


def test_importing_the_core_and_diagnostics_loads_no_backend() -> None:
    code = (
        "import sys, probdyn, probdyn.core, probdyn.diagnostics, probdyn.engines, "
        "probdyn.primitives, probdyn.calibration, probdyn.data\n"
        "import probdyn.diagnostics.calibration, probdyn.diagnostics.sbc, "
        "probdyn.diagnostics.compare\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {BACKEND_MODULES!r} "
        "or m.startswith(('probdyn.numpyro', 'probdyn.pyro')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_twin_folders_share_few_code_lines() -> None:
    spec = importlib.util.spec_from_file_location("twin_lines", ROOT / "tools" / "twin_lines.py")
    assert spec and spec.loader
    twin_lines = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(twin_lines)
    report = twin_lines.twin_report(ROOT)
    assert "primitives/latent_sde.py" in report  # the pairing itself works
    total = sum(report.values())
    assert total < MAX_TWIN_LINES, sorted(report.items(), key=lambda kv: -kv[1])


def test_twin_line_count_sees_a_copied_function(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("twin_lines", ROOT / "tools" / "twin_lines.py")
    assert spec and spec.loader
    twin_lines = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(twin_lines)
    body = "".join(f"    x{i} = {i} * 2\n" for i in range(8))
    for backend in ("numpyro", "pyro"):
        folder = tmp_path / "probdyn" / backend
        folder.mkdir(parents=True)
        (folder / "m.py").write_text(f'"""doc"""\nimport os\n\n\ndef f():\n{body}')
    assert twin_lines.twin_report(tmp_path) == {"m.py": 8}  # the 8 body lines (not the def)


def test_no_module_over_the_limit_without_a_reason() -> None:
    reason = "longer than 500 lines because"
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and reason not in doc.lower():
            long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long, "\n".join(long)


# -- the registry is open to a third backend --------------------------------------------
class _ToyPosteriorRunner:
    """A runner of the toy backend: one chain of the model's ``mu`` drawn from N(0, 1)."""

    def __call__(self, model, args, kwargs, engine, key):
        draws = np.random.default_rng(key).normal(size=(1, 50))
        return probdyn.Posterior(
            samples={"mu": draws},
            attrs={"backend": "toy"},
            model=model,
            model_args=args,
            model_kwargs=kwargs,
        )


def _toy_services() -> types.ModuleType:
    services = types.ModuleType("probdyn_toy_services")

    def probe(model, args, kwargs):
        return True

    def predict(post, args, kwargs, *, key, sites, num_draws):
        return {"y": post.samples["mu"][..., None] + np.asarray(args[0])}

    services.probe = probe  # type: ignore[attr-defined]
    services.predict = predict  # type: ignore[attr-defined]
    return services


def test_a_third_backend_plugs_in_through_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "probdyn_toy_services", _toy_services())
    monkeypatch.setitem(sys.modules, "toyppl", types.ModuleType("toyppl"))
    from probdyn.core import backends

    monkeypatch.setattr(backends, "_BACKENDS", dict(backends._BACKENDS))
    monkeypatch.setattr(backends, "_RUNNERS", dict(backends._RUNNERS))
    register_backend(Backend("toy", packages=("toyppl",), services="probdyn_toy_services"))
    probdyn.register_runner(probdyn.VI, "toy", _ToyPosteriorRunner())

    toyppl = sys.modules["toyppl"]

    def model(x):
        return toyppl  # the model names the toy PPL, so fit detects the backend

    post = probdyn.fit(model, np.zeros(3), engine=probdyn.VI(), key=3)
    assert post.backend == "toy"
    assert post.samples["mu"].shape == (1, 50)
    assert post.predict(np.ones(3))["y"].shape == (1, 50, 3)
    with pytest.raises(NotImplementedError, match=r"No NUTS runner for the 'toy' backend"):
        probdyn.fit(model, np.zeros(3), engine=probdyn.NUTS())
    with pytest.raises(NotImplementedError, match="no 'trace_once' service"):
        backends.get_backend("toy").service("trace_once")


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"register_runner\(backend='jaxx'\).*numpyro"):
        probdyn.register_runner(probdyn.NUTS, "jaxx", "x:y")
    with pytest.raises(ValueError, match="choose one of 'numpyro', 'pyro'"):
        probdyn.core.get_backend("tensorflow")
