"""The shape of the code base, checked from its source: who runs where (the launcher's folders never import
torch at module level, the rank's folders never import MLflow), no import cycles, no process-global state,
every option of every config group one jump away from its code, every metric name written in one place."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest
from hydra.utils import get_object

from costlab import CONF_DIR, ROOT
from costlab.launcher.preflight import compose_config

SRC = ROOT / "src" / "costlab"
MODULES = {
    ".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in SRC.rglob("*.py")
}


def _imports(path: Path) -> set[str]:
    """The costlab modules ``path`` imports, at any depth of the file (function-local imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from costlab.x import y" imports costlab.x.y when that is a module, else costlab.x
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n in MODULES)
    return found


def test_no_import_cycles_inside_the_package():
    graph = {m: _imports(p) for m, p in MODULES.items()}
    # Tarjan's strongly connected components: any component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for n in graph[m]:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                component.append(n)
                if n == m:
                    break
            if len(component) > 1 or m in graph[m]:
                cycles.append(sorted(component))

    for m in graph:
        if m not in index:
            visit(m)
    assert not cycles, cycles


LAUNCHER_SIDE = ("launcher", "tracking", "report")  # run.py's process: never torch at module level, never CUDA
RANK_SIDE = ("training", "data", "models", "parallelism", "precision", "pruning", "quantization")  # never MLflow
TOP_LEVEL_MAX = 9  # the few shared pieces beside the folders (the package's face included)


def _folder(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def test_the_top_of_the_package_holds_only_the_few_shared_pieces():
    top = sorted(p.name for p in SRC.glob("*.py"))
    assert len(top) <= TOP_LEVEL_MAX, top
    folders = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert {*LAUNCHER_SIDE, *RANK_SIDE, "measure"} - {"precision"} <= folders


def _all_imports(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth, costlab's or not."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_ranks_side_never_imports_mlflow():
    """Not even inside a function: rank 0 writes events and run.py relays them (a rank whose launcher died
    starts ``python -m costlab.tracking.relay``, a launcher-side process, to close the run)."""
    def mlflow_side(name: str) -> bool:
        return name.split(".")[0] == "mlflow" or name.startswith("costlab.tracking")

    offenders = {m: sorted(filter(mlflow_side, _all_imports(p))) for m, p in MODULES.items() if _folder(m) in RANK_SIDE}
    assert not {m: v for m, v in offenders.items() if v}


def test_the_launchers_side_imports_no_torch_when_loaded():
    """Every module of the launcher's folders loaded in one fresh interpreter: torch is not among what they
    pulled in (a check may import it inside a function, as the meta-device shapes do)."""
    import subprocess
    import sys

    mods = sorted(m for m in MODULES if _folder(m) in LAUNCHER_SIDE and not m.endswith("__main__"))
    code = f"import sys\nfor m in {mods!r}: __import__(m)\nprint(sorted(m for m in sys.modules if m == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert len(mods) > 15 and out.strip() == "[]", out


MUTABLE_CALLS = {"list", "dict", "set", "defaultdict", "deque", "OrderedDict", "Counter", "bytearray"}
MUTATORS = {"append", "extend", "insert", "update", "add", "pop", "popitem", "clear", "remove", "discard",
            "setdefault", "appendleft", "extendleft", "sort", "reverse"}


def _module_containers(tree: ast.Module) -> dict[str, int]:
    """Names bound at module level to a mutable container (a list, dict or set display or constructor)."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            v = node.value
            mutable = isinstance(v, ast.List | ast.Dict | ast.Set | ast.ListComp | ast.DictComp | ast.SetComp) or (
                isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id in MUTABLE_CALLS)
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name) and mutable:
                        found[name.id] = node.lineno
    return found


def test_no_module_level_mutable_state():
    """A module-level container is a constant: named in capitals (or ``__all__``) and never changed by the
    code (no mutating call, item assignment or deletion on it anywhere in the module)."""
    offenders = []
    for path in MODULES.values():
        tree = ast.parse(path.read_text())
        containers = _module_containers(tree)
        for name, line in containers.items():
            if name != "__all__" and name.lstrip("_") != name.lstrip("_").upper():
                offenders.append(f"{path.relative_to(ROOT)}:{line} {name} (state, not a constant)")
        for node in ast.walk(tree):
            changed = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
                changed = node.func.value
            elif isinstance(node, ast.Assign | ast.AugAssign | ast.Delete):
                for target in node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]:
                    if isinstance(target, ast.Subscript):
                        changed = target.value
            if isinstance(changed, ast.Name) and changed.id in containers:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} changes {changed.id}")
    assert not offenders, offenders


def test_no_folder_imports_one_that_imports_it_back():
    """The folders stack: a lever may use measure/ and models/, training/ may use the levers, but never both
    ways round (a lever that needs the trainer's loop is handed it, as pruning's recovery is)."""
    edges = {(_folder(m), _folder(n)) for m, p in MODULES.items() for n in _imports(p)}
    edges = {(a, b) for a, b in edges if a != b}
    assert not sorted((a, b) for a, b in edges if (b, a) in edges)


def test_no_global_statements():
    offenders = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in MODULES.values()
                 for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Global | ast.Nonlocal)]
    assert not offenders, offenders


GROUPS = sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir() and d.name != "experiment")
CODE_NOTE = re.compile(r"Code: (costlab/[\w/]+\.py)")


@pytest.mark.parametrize("path", sorted(p for g in GROUPS for p in (CONF_DIR / g).glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_option_is_one_jump_from_its_code(path):
    """``conf/<group>/<option>.yaml`` names its class with ``_target_``, or the module of the same name
    exists, or (options that are only settings of their group's code) its header names the file."""
    text = path.read_text()
    group, option = path.parent.name, path.stem
    node = compose_config([f"{group}={option}"])[group]  # options may inherit their _target_ (model=gpt_micro)
    if "_target_" in node:
        assert callable(get_object(node["_target_"])), node["_target_"]
        return
    if f"costlab.{group}.{option}" in MODULES:
        return
    named = CODE_NOTE.search(text)
    assert named, f"conf/{group}/{option}.yaml names no _target_, has no module costlab/{group}/{option}.py " \
                  "and no 'Code: costlab/...py' note"
    assert (SRC.parent / named.group(1)).is_file(), named.group(1)


METRIC = re.compile(r"^(train|val|eval|perf|mem|model|infer|time|pruning|quantization|data|tracking|cost|energy|fault)"
                    r"/[a-z0-9_]+$")


def test_every_metric_name_is_written_in_one_place():
    places = defaultdict(list)
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and METRIC.match(node.value):
                places[node.value].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert len(places) > 30  # the scan sees the contract's metrics
    repeated = {k: v for k, v in places.items() if len(v) > 1}
    assert not repeated, repeated
