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
import re
import subprocess
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
    # and no code it does not import (editing it would make the stage stale for nothing)
    extra = sorted(str(d.relative_to(ROOT)) for d in deps
                   if d.parts[len(ROOT.parts)] in PROJECT_PACKAGES
                   and not any(p == d or d in p.parents for p in closure))
    assert not extra, f"dvc.yaml stage {stage!r} depends on code it does not import: {extra}"


def _expanded(params: list) -> set[str]:
    """``dvc.yaml`` params as ``section.key`` (a whole section listed by its name)."""
    from pipeline.config import Config

    tree = Config().to_dict()
    return {f"{p}.{key}" for p in params if p in tree for key in tree[p]} | {
        p for p in params if p not in tree}


def test_each_stages_params_are_the_ones_that_change_its_result():
    """``dvc.yaml``'s params are derived from the one mark of operational parameters in the
    schema, as the resume keys are: prepare the data parameters, the training stages their run
    keys' parameters, the sweep its key's, evaluate the evaluation ones; none operational."""
    from pipeline.config import Config
    from pipeline.config.schema import operational_keys
    from pipeline.sweep.space import key_params as sweep_params
    from pipeline.training.resume import key_params as train_params

    tree = Config().to_dict()
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    operational = set(operational_keys())
    expected = {
        "prepare": {f"data.{k}" for k in tree["data"]} - operational,
        "train_rpn": set(train_params("rpn")), "train_frcnn": set(train_params("frcnn")),
        "evaluate": {f"eval.{k}" for k in tree["eval"]} - operational,
        "sweep": set(sweep_params()),
    }
    for stage, keys in expected.items():
        assert _expanded(stages[stage]["params"]) == keys, stage
    assert "train.frcnn_epochs" not in expected["train_rpn"]
    assert {"train.worker_resources", "train.storage_path"} <= operational


def test_dvc_yaml_takes_its_paths_from_params_yaml():
    """No path that params.yaml owns is written out in dvc.yaml: every one is ``${...}``."""
    from pipeline.config import load_config

    flat = load_config([ROOT / "params.yaml"]).flat()
    owned = {str(v) for k, v in flat.items() if k in (
        "data.out_dir", "train.rpn_model", "train.frcnn_model", "train.metrics_dir",
        "eval.reports_dir", "eval.metrics_path", "sweep.table_path", "sweep.best_params_path",
        "sweep.plot_path")}
    text = (ROOT / "dvc.yaml").read_text()
    written = {w for w in owned if re.search(rf"(?m)^\s*-\s*{re.escape(w)}\b", text)}
    assert written == set(), f"dvc.yaml repeats paths of params.yaml: {sorted(written)}"
    assert "${data.out_dir}" in text and "${train.rpn_model}" in text


def test_stage_deps_name_existing_paths_and_pycache_is_ignored():
    for stage, deps in _stage_deps().items():
        for dep in deps:
            if not dep.startswith("${"):
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


# --------------------------------------------------------------------------------------------
# No import cycles, function-level imports included


def _runtime_imports(path: Path) -> set[str]:
    """Project modules ``path`` imports, at the top or inside functions (``import a.b`` and
    ``from a import b`` name ``a.b`` when it is a module, else ``a``); what only type checkers
    read (``if TYPE_CHECKING:``) is left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and ast.unparse(node.test).endswith("TYPE_CHECKING") for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if _module_path(child) is not None else node.module)
    return {name for name in found if name.split(".")[0] in PROJECT_PACKAGES
            and _module_path(name) is not None}


def import_cycles() -> list[list[str]]:
    """The import graph's strongly connected components of more than one module (Tarjan)."""
    graph = {}
    for path in _python_files(*PROJECT_PACKAGES):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = sorted(_runtime_imports(path) - {name})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, []):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles_function_level_imports_included():
    assert import_cycles() == []


# --------------------------------------------------------------------------------------------
# The README and docs/ name only what exists


#: What the pipeline writes when it runs (named in the docs, absent from a clone)
GENERATED = ("data/", "models/", "metrics/", "reports/", "sweeps/", "checkpoints", "ray_results",
             "mlflow.db", "mlartifacts", ".venv", "gpu_results", "overlays/fitted")
_PATH = re.compile(r"`([A-Za-z0-9_.][\w.\-/]*)`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def named_paths(path: Path) -> list[tuple[str, Path]]:
    """``(as written, resolved)`` of every repository path a Markdown file names: link targets
    (relative to the file) and code spans that look like paths (relative to the root)."""
    text = path.read_text(encoding="utf-8")
    found = [(t, (path.parent / t.split("#")[0]).resolve()) for t in _LINK.findall(text)
             if "://" not in t and not t.startswith("#")]
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    top = {name.split("/")[0] for name in tracked}
    for token in _PATH.findall(text):
        # a path into the repository: its first part is one of the clone's top-level entries
        if token.startswith("../") or (token.split("/")[0] in top
                                       and not token.startswith(GENERATED)):
            found.append((token, (ROOT / token).resolve()))
    return found


def test_every_path_the_readme_and_docs_name_exists_inside_the_repository():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    outside = [f"{f.name}: {t}" for f in files for t, p in named_paths(f)
               if ROOT not in p.parents and p != ROOT]
    missing = [f"{f.name}: {t}" for f in files for t, p in named_paths(f)
               if ROOT in p.parents and not p.exists()]
    assert outside == [], "paths outside the repository:\n" + "\n".join(outside)
    assert missing == [], "paths that do not exist:\n" + "\n".join(missing)


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
