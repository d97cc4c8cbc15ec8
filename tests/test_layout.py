"""The package layout as docs/design.md states it: imports flow one way and never in a circle.

The graph is read from the source with `ast`, so imports inside functions count as much as module-level ones
(a cycle hidden in a function is still a cycle). Nodes are modules of `diffenv`, `agents` and `rewards`;
`from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg` (its `__init__`).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the runtime packages, and `retrain/` (the weight-training scripts: they use the packages, never the reverse)
PACKAGES = ("diffenv", "agents", "rewards", "retrain")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in the file that names a module of ours."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import diffenv.models.lora as x` names a module; attributes do not
                target = target.rpartition(".")[0]
            if target and target != this:
                out.append((target, id(node) in top))
    return out


def graph() -> dict[str, dict[str, bool]]:
    """module -> {imported module: imported at module level somewhere in the file}."""
    mods = modules()
    g: dict[str, dict[str, bool]] = {}
    for name, path in mods.items():
        edges: dict[str, bool] = {}
        for target, top in imports(path, set(mods)):
            edges[target] = edges.get(target, False) or top
        g[name] = edges
    return g


def cycles(g: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in g.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_level_imports():
    g = graph()
    assert "diffenv.sampling" in g["agents.trainer"]  # imported inside Trainer.evaluate
    assert g["agents.trainer"]["agents.policy"] is True and g["agents.trainer"]["diffenv.sampling"] is False


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_cycle_detection_finds_a_planted_cycle():
    g = {"a": {"b": True}, "b": {"c": False}, "c": {"a": False}, "d": {"a": True}}
    assert cycles(g) == [["a", "b", "c"]]


def test_imports_flow_one_way():
    """`diffenv` and `rewards` never import `agents`; `rewards` never imports `diffenv`; no package imports the
    weight-training scripts of `retrain/`. No exceptions."""
    for name, edges in graph().items():
        pkg = name.split(".")[0]
        if pkg in ("diffenv", "rewards"):
            assert not [t for t in edges if t.split(".")[0] == "agents"], name
        if pkg == "rewards":
            assert not [t for t in edges if t.split(".")[0] == "diffenv"], name
        if pkg != "retrain":
            assert not [t for t in edges if t.split(".")[0] == "retrain"], name


def test_core_uses_no_integration_and_no_benchmark_harness():
    """`agents` core (everything outside `integrations/` and `benchmark/`, and the `diffenv` command) imports no
    library integration and nothing of the benchmark harness (the trainer's probes score with the task's metrics,
    `diffenv.metrics`). The integrations never import the harness."""
    for name, edges in graph().items():
        if name.startswith(("agents.integrations", "agents.benchmark")) or name in ("agents.cli", "agents"):
            continue
        if name.startswith("agents"):
            assert not [t for t in edges if t.startswith("agents.integrations")], name
            assert not [t for t in edges if t.startswith("agents.benchmark")], name
    for name, edges in graph().items():
        if name.startswith("agents.integrations"):
            assert not [t for t in edges if t.startswith("agents.benchmark")], name


def test_no_issue_numbers_in_code_docs_or_generated_reports():
    """Code, docstrings, configs, docs and the committed reports say what a target is, never which tracker issue
    asked for it: a reader outside the tracker could not follow "issue #N"."""
    import re

    pattern = re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE)
    files = [ROOT / "README.md", *[p for d in (*PACKAGES, "benchmarks", "examples", "tests", "docs")
                                   for ext in ("*.py", "*.toml", "*.md", "*.yml")
                                   for p in sorted((ROOT / d).rglob(ext))]]
    found = [f"{p.relative_to(ROOT)}:{i}: {m.group(0)}" for p in files
             for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) for m in pattern.finditer(line)]
    assert not found, found
