"""The layout rule (DESIGN.md "Adapter designs are plug-ins"): imports only go down the layers, and no module imports
itself through others. The walk is static (ast): module-level imports, imports inside functions and imports under
TYPE_CHECKING all count."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# low to high; a module may import its own layer and the ones below
LAYERS = [
    ("llm",),
    ("data",),
    ("encoders", "adapters"),
    ("mm.model",),
    ("mm.train", "mm.eval"),
    ("mm.stages", "mm.config"),
    ("mm",),  # the CLI room: mm.cli, mm.runner, mm.demo, the import commands
]
PACKAGES = ("llm", "data", "encoders", "adapters", "mm")


def layer_of(module: str) -> int:
    """The layer of a dotted module name (the most specific prefix wins)."""
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and p.count(".") > depth:
                best, depth = i, p.count(".")
    if best is None:
        raise KeyError(module)
    return best


def modules(root: Path = REPO) -> dict[str, Path]:
    out = {}
    for top in PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the project modules it imports anywhere in its file}."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                t = resolve(n)
                if t and t != m:
                    found.add(t)
        edges[m] = found
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, bs in edges.items() for b in bs
                  if b not in ("mm",) and layer_of(b) > layer_of(a))


def test_no_import_cycle_and_no_upward_import():
    edges = import_graph(modules())
    assert cycles(edges) == []
    assert upward(edges) == []


def test_stages_are_imported_only_by_the_runner_and_other_stages():
    edges = import_graph(modules())
    users = sorted(a for a, bs in edges.items() for b in bs
                   if b.startswith("mm.stages") and not a.startswith("mm.stages") and a not in ("mm.runner",))
    assert users == []


def test_the_walk_sees_function_level_and_type_checking_imports(tmp_path):
    """The checker itself: a cycle through a function-level import and an upward import under TYPE_CHECKING are
    both found."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "llm" / "a.py").write_text("def f():\n    from llm import b\n")
    (tmp_path / "llm" / "b.py").write_text("from llm.a import f\n")
    (tmp_path / "data" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                            "    from mm.model import x\n")
    (tmp_path / "mm" / "model").mkdir()
    (tmp_path / "mm" / "model" / "__init__.py").write_text("")
    (tmp_path / "mm" / "model" / "x.py").write_text("")
    edges = import_graph(modules(tmp_path))
    assert cycles(edges) == [["llm.a", "llm.b"]]
    assert upward(edges) == ["data.c -> mm.model", "data.c -> mm.model.x"]


@pytest.mark.parametrize("name,layer", [("llm.model", 0), ("data.dialog", 1), ("adapters.registry", 2),
                                        ("mm.model.composed", 3), ("mm.eval.image", 4), ("mm.stages.video", 5),
                                        ("mm.cli", 6)])
def test_layer_of(name, layer):
    assert layer_of(name) == layer
