"""Packaging: `models/` and `solvers/` install as `nitsum_opt.models` / `nitsum_opt.solvers` only, every package
is listed in pyproject, and the dependency arrows between the packages point one way."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {
    "nitsum_opt": "nitsum_opt",
    "nitsum_opt.models": "models",
    "nitsum_opt.solvers": "solvers",
    "nitsum_runtime": "nitsum_runtime",
}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for name, folder in PACKAGE_DIRS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found == listed, f"add to / remove from pyproject packages: {sorted(found ^ listed)}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return next(out.glob("nitsum-*.whl"))


def test_wheel_has_no_top_level_models_or_solvers(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"nitsum_opt", "nitsum_runtime"}, tops
    assert "nitsum_opt/models/spec.py" in names and "nitsum_opt/solvers/model.py" in names


def test_installed_package_imports_in_namespace(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        "import importlib.util, nitsum_opt, nitsum_opt.models, nitsum_opt.solvers;"
        f"assert nitsum_opt.models.__file__.startswith({str(target)!r}), nitsum_opt.models.__file__;"
        "assert importlib.util.find_spec('models') is None and importlib.util.find_spec('solvers') is None;"
        "print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip() == "ok", proc.stderr


def _imports(folder: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in (ROOT / folder).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


def test_dependency_arrows_point_one_way() -> None:
    for path, names in _imports("models").items():
        bad = {
            n
            for n in names
            if n.startswith(("nitsum_opt", "nitsum_runtime", "vllm", "ortools", "pulp"))
            and not n.startswith("nitsum_opt.models")
        }
        assert not bad, f"{path} imports {bad}: models/ must not import the planner, the solvers or the runtime"
    for path, names in _imports("solvers").items():
        bad = {
            n
            for n in names
            if n.startswith(("nitsum_opt", "nitsum_runtime", "vllm")) and not n.startswith("nitsum_opt.solvers")
        }
        assert not bad, f"{path} imports {bad}: solvers/ knows nothing of LLMs"
    for path, names in _imports("nitsum_opt").items():
        bad = {n for n in names if n.startswith(("nitsum_runtime", "vllm", "torch"))}
        assert not bad, f"{path} imports {bad}: nitsum_opt must not depend on the runtime"
    formulation = _imports("nitsum_opt")["nitsum_opt/formulation.py"]
    assert not {n for n in formulation if n.startswith(("ortools", "pulp", "highspy", "sklearn"))}
    everything = {
        p: names for f in ("nitsum_opt", "models", "solvers", "nitsum_runtime") for p, names in _imports(f).items()
    }
    vllm_users = sorted(p for p, names in everything.items() if any(n.split(".")[0] == "vllm" for n in names))
    # vllm_engine.py is the adapter; kv_connector.py is loaded by vLLM itself (kv_connector_module_path) inside
    # the engine process, and no project module may import it.
    assert set(vllm_users) <= {"nitsum_runtime/vllm_engine.py", "nitsum_runtime/kv_connector.py"}, vllm_users
    importers = [
        p for p, names in everything.items() if any(n.startswith("nitsum_runtime.kv_connector") for n in names)
    ]
    assert not importers, f"{importers} import nitsum_runtime.kv_connector (only vLLM loads it)"
