"""The shape of the code base, checked from its source: no import cycles, no process-global state, every
option of every config group one jump away from its code, every metric name written in one place."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest
from hydra.utils import get_object

from costlab import CONF_DIR, ROOT
from costlab.cli import compose_config

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
