"""The shape of the code base: who may import what, and what each DVC stage depends on.

- Every MLflow call goes through ``pipeline/tracking/`` (which redacts credentials): no other
  module of ``pipeline/`` or ``detector/`` imports ``mlflow`` (the models-from-code file MLflow
  loads to serve a model lives there too: ``pipeline/tracking/served_model.py``).
- ``detector/`` is pure PyTorch + torchvision: no Ray, MLflow or DVC.
- No test module imports another test module (shared scaffolding lives in ``tests/support``).
- Each stage of ``dvc.yaml`` declares, as a dependency, every project module its command
  imports (computed statically: the import closure of ``pipeline.cli`` plus the stage's entry
  package, function-level imports included), so editing any of them makes the stage stale.
- Stage packages keep their entry points thin and no module shadows the standard library.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

STAGE_MODULES = {"prepare": "pipeline.prepare", "train_rpn": "pipeline.training",
                 "train_frcnn": "pipeline.training", "evaluate": "pipeline.evaluation",
                 "sweep": "pipeline.sweep"}
PROJECT_PACKAGES = ("pipeline", "detector")


def _module_path(name: str) -> Path | None:
    """The file of project module ``name`` (a package's ``__init__.py``), or None."""
    base = ROOT.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _imports(path: Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (top level and inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from pipeline import tracking`: a submodule, when there is one
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if _module_path(f"{node.module}.{a.name}") is not None}
    return {name for name in found if name.split(".")[0] in PROJECT_PACKAGES
            and _module_path(name) is not None}


def import_closure(*roots: str) -> set[Path]:
    """Files of every project module the ``roots`` import, transitively, with the packages
    that contain them (importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py``)."""
    todo, seen = list(roots), set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            module = ".".join(parts[:i])
            if module in seen:
                continue
            seen.add(module)
            path = _module_path(module)
            if path is not None:
                todo.extend(_imports(path))
    return {_module_path(m) for m in seen if _module_path(m) is not None}


def _stage_deps() -> dict[str, list[str]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: [str(d) for d in spec["deps"]] for name, spec in stages.items()}


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_every_module_a_stage_imports_is_one_of_its_dvc_deps(stage):
    deps = [ROOT / d for d in _stage_deps()[stage]]
    closure = import_closure("pipeline.cli", STAGE_MODULES[stage])
    assert _module_path(STAGE_MODULES[stage]) in closure
    missing = sorted(str(p.relative_to(ROOT)) for p in closure
                     if not any(p == d or d in p.parents for d in deps))
    assert not missing, f"dvc.yaml stage {stage!r} misses deps: {missing}"


def test_stage_deps_name_existing_paths_and_pycache_is_ignored():
    for stage, deps in _stage_deps().items():
        for dep in deps:
            if not dep.startswith(("data/", "models/")):
                assert (ROOT / dep).exists(), f"{stage}: {dep} does not exist"
    ignored = (ROOT / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored


def test_the_closure_sees_function_level_imports():
    closure = import_closure("pipeline.training")
    # pipeline.training.run imports its driver inside the function; the loop builds the model
    # through pipeline.modeling, which imports detector inside a function
    assert ROOT / "pipeline" / "training" / "driver.py" in closure
    assert ROOT / "detector" / "model.py" in closure


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py")
                  if "__pycache__" not in p.parts)


def _top_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_tracking_package_imports_mlflow():
    importers = [str(p.relative_to(ROOT)) for p in _python_files("pipeline", "detector")
                 if "mlflow" in _top_level_imports(p)]
    assert importers and all(p.startswith("pipeline/tracking/") for p in importers), importers


def test_detector_imports_no_ray_mlflow_or_dvc():
    for path in _python_files("detector"):
        assert not {"ray", "mlflow", "dvc"} & _top_level_imports(path), path


def test_no_test_module_imports_another():
    offenders = []
    for path in _python_files("tests"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                leaf = node.module.rsplit(".", 1)[-1]
                if node.module.startswith("tests.") and leaf.startswith("test_"):
                    offenders.append(f"{path.relative_to(ROOT)}: {node.module}")
    assert not offenders


def test_stage_packages_have_thin_entry_points_and_no_module_shadows_the_stdlib():
    for package in ("prepare", "training", "evaluation", "sweep"):
        init = ROOT / "pipeline" / package / "__init__.py"
        functions = [n.name for n in ast.parse(init.read_text()).body
                     if isinstance(n, ast.FunctionDef)]
        assert functions == ["run"], f"{init}: {functions}"
    stdlib = set(sys.stdlib_module_names)
    for path in _python_files("pipeline", "detector"):
        assert path.stem not in stdlib or path.stem == "__init__", path


# --------------------------------------------------------------------------------------------
# Public APIs only: a private name of a third-party package breaks on its next minor release


def _third_party(name: str) -> bool:
    top = name.split(".")[0]
    return bool(top) and top not in sys.stdlib_module_names and top not in (
        *PROJECT_PACKAGES, "tests", "benchmarks", "__future__")


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def private_uses(source: str) -> list[str]:
    """``line: what`` for every private name of a third-party package in ``source``: an
    import of a ``_``-prefixed module or name (``from ray._private import services``,
    ``from x import _y``), a ``_``-prefixed attribute of a name bound to a third-party import
    (``utils._tracking_uri``), and a ``self._x`` read in a subclass of a third-party class that
    the subclass neither assigns nor defines itself (ASHA's ``self._max_t``)."""
    tree = ast.parse(source)
    found, bound = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _third_party(alias.name):
                    bound.add(alias.asname or alias.name.split(".")[0])
                    if any(map(_private, alias.name.split("."))):
                        found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and _third_party(node.module):
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                if any(map(_private, [*node.module.split("."), alias.name])):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.ClassDef) and any(
                isinstance(b, (ast.Name, ast.Attribute))
                and ast.unparse(b).split(".")[0] in bound for b in node.bases):
            own = {t.attr for n in ast.walk(node) if isinstance(n, (ast.Assign, ast.AnnAssign))
                   for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                   if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                   and t.value.id == "self"}
            own |= {n.name for n in node.body if isinstance(n, (ast.FunctionDef,
                                                                 ast.AsyncFunctionDef))}
            found += [f"{n.lineno}: self.{n.attr} (of {ast.unparse(node.bases[0])})"
                      for n in ast.walk(node) if isinstance(n, ast.Attribute)
                      and isinstance(n.value, ast.Name) and n.value.id == "self"
                      and _private(n.attr) and n.attr not in own]
    return found


def test_the_private_api_check_finds_each_kind():
    source = ("from ray._private import services\nimport mlflow.tracking._tracking_service\n"
              "from mlflow.tracking import _tracking_service\nimport mlflow\n"
              "x = mlflow.tracking._x\nfrom ray.tune.schedulers import ASHAScheduler\n"
              "class A(ASHAScheduler):\n    def f(self):\n        self._own = 1\n"
              "        return self._max_t, self._own\n"
              "import os\ny = os._exit\nfrom pipeline import storage\nz = storage._locked\n")
    assert sorted(int(line.split(":")[0]) for line in private_uses(source)) == [1, 2, 3, 5, 10]


@pytest.mark.parametrize("package", PROJECT_PACKAGES)
def test_no_private_api_of_a_third_party_package(package):
    """``pipeline/`` and ``detector/`` use Ray, MLflow, torch and the rest through their public
    APIs only."""
    hits = [f"{path.relative_to(ROOT)}:{hit}" for path in sorted((ROOT / package).rglob("*.py"))
            for hit in private_uses(path.read_text(encoding="utf-8"))]
    assert hits == [], "private APIs of third-party packages:\n" + "\n".join(hits)
