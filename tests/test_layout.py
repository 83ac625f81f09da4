"""The package's import contracts, read from the source (AST), so the listing keeps reading like the method:
core is the maths and imports no app, trainer or tool; nothing in the library imports the tools; only the studio
imports gradio, and only its launcher starts a process; no module starts a script by path (subprocesses run
`sys.executable -m splam_studio.training` / `-m splam_studio.studio`)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "splam_studio"
LAYERS = ("core", "store", "training", "models", "shapes", "studio", "tools")
CORE_FORBIDDEN_LIBS = {"gradio", "accelerate", "datasets", "webdataset"}
CORE_FORBIDDEN_OURS = {"training", "studio", "tools", "shapes", "models", "store"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Absolute names of every module imported anywhere in the file (top level and inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]  # `from . import x` imports the module x
    return out


def _files() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def _layer(path: Path) -> str | None:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else None


def test_every_module_is_in_a_layer():
    loose = [p.name for p in PKG.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside the subpackages {LAYERS}: {loose}"
    assert {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(LAYERS)


def test_core_imports_no_app_trainer_or_tool():
    bad = []
    for f in _files():
        if _layer(f) != "core":
            continue
        for mod in _imports(f):
            top = mod.split(".")[0]
            if top in CORE_FORBIDDEN_LIBS:
                bad.append(f"{f.name}: {mod}")
            parts = mod.split(".")
            if top == "splam_studio" and len(parts) > 1 and parts[1] in CORE_FORBIDDEN_OURS:
                bad.append(f"{f.name}: {mod}")
    assert not bad, bad
    assert len([f for f in _files() if _layer(f) == "core"]) >= 9


# Who may import whom, below the app: store (files) < models (loading, export) < training (the loop; it also reads the
# Shapes world as a data source). A layer imports
# only the ones left of it, so no import has to be hidden inside a function to dodge a cycle.
ALLOWED_OURS = {"store": {"store"}, "models": {"core", "store", "models"}, "training": {"core", "store", "models", "shapes", "training"}}


def test_layers_import_only_what_lies_below_them():
    bad = [f"{f.relative_to(PKG)}: {mod}" for f in _files() if _layer(f) in ALLOWED_OURS
           for mod in _imports(f) if mod.startswith("splam_studio.") and mod.split(".")[1] not in ALLOWED_OURS[_layer(f)]]
    assert not bad, bad


def test_the_trainer_imports_the_models_at_module_level():
    """A lazy import inside a function is how a cycle hides; the trainer's imports of the loaders stay at the top."""
    tree = ast.parse((PKG / "training" / "loop.py").read_text())
    lazy = [node.module for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
            for node in ast.walk(fn) if isinstance(node, ast.ImportFrom) and node.module and "models" in node.module]
    assert not lazy, lazy


def test_nothing_outside_tools_imports_tools():
    bad = [f"{f.relative_to(PKG)}: {mod}" for f in _files() if _layer(f) != "tools"
           for mod in _imports(f) if mod.startswith("splam_studio.tools")]
    assert not bad, bad


def test_only_the_studio_imports_gradio_and_only_its_launcher_starts_processes():
    """The library below the app (core, training, models, shapes) runs without a UI; outside the tools, a subprocess
    is started in one place, the studio's run launcher."""
    ui = [f"{f.relative_to(PKG)}: {mod}" for f in _files() if _layer(f) not in ("studio", "tools")
          for mod in _imports(f) if mod.split(".")[0] == "gradio"]
    assert not ui, ui
    spawns = sorted(str(f.relative_to(PKG)) for f in _files() if _layer(f) != "tools" and "subprocess" in _imports(f))
    assert spawns == ["studio/launcher.py"], spawns


def test_the_checks_see_relative_imports():
    """The resolver itself: a relative import in core resolves to the absolute module it names."""
    assert "splam_studio.core.schedule" in _imports(PKG / "core" / "sampler.py")
    assert "splam_studio.models.generation" in _imports(PKG / "tools" / "bench.py")


def _script_paths(tree: ast.AST) -> list[str]:
    """String constants naming a .py file that are joined into a path (`ROOT / "x.py"`) or passed in a command list."""
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and isinstance(side.value, str) and side.value.endswith(".py"):
                    hits.append(side.value)
        if isinstance(node, ast.List):
            hits += [e.value for e in node.elts
                     if isinstance(e, ast.Constant) and isinstance(e.value, str) and e.value.endswith(".py")]
    return hits


def test_no_module_starts_a_script_by_path():
    bad = {str(f.relative_to(PKG)): hits for f in _files() if (hits := _script_paths(ast.parse(f.read_text())))}
    assert not bad, f"run `sys.executable -m splam_studio.training` (or .studio), not a script path: {bad}"
    assert _script_paths(ast.parse('cmd = [sys.executable, str(ROOT / "train_cli.py")]')) == ["train_cli.py"]


def test_entry_points_are_modules_of_the_package():
    assert (PKG / "training" / "__main__.py").is_file() and (PKG / "studio" / "__main__.py").is_file()
    text = (PKG.parent / "pyproject.toml").read_text()
    assert '"splam_studio.training.cli:main"' in text and '"splam_studio.studio.app:main"' in text


def test_entry_points_run_as_modules(tmp_path):
    """`python -m splam_studio.training` and `-m splam_studio.studio` answer from any folder (not only the repo root)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(PKG.parent)}
    r = subprocess.run([sys.executable, "-m", "splam_studio.training", "--preset", "shapes", "--print-config"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads(r.stdout)
    assert (cfg["max_steps"], cfg["lr"], cfg["w"]) == (600, 1e-5, 6.5)
    r = subprocess.run([sys.executable, "-m", "splam_studio.studio", "--help"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0 and "--weights-dir" in r.stdout, r.stderr[-2000:]
