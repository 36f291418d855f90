"""The package map's arrows point downward (DESIGN.md): `model/` knows nothing of where
experts live or how int4 kernels batch them, and no two modules import each other."""

import ast
from pathlib import Path

import moe_edge

ROOT = Path(moe_edge.__file__).parent


def imports_of(path: Path) -> set[str]:
    """Every moe_edge module `path` imports, at any depth of the file (function-level too)."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("moe_edge")}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module.startswith("moe_edge"):
                found.add(module)
                found |= {f"{module}.{a.name}" for a in node.names}  # `from . import x`
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_model_imports_nothing_from_quant_or_offload():
    for path in (ROOT / "model").glob("*.py"):
        bad = {m for m in imports_of(path) if m.startswith(("moe_edge.quant", "moe_edge.offload"))}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_imports_parse_relative_levels():
    """The checker itself: a file that does import quant is caught (so the test above can fail)."""
    moe = ROOT / "offload" / "cache.py"
    assert "moe_edge.quant.experts" in imports_of(moe)


def test_no_two_modules_import_each_other():
    graph = {module_name(p): imports_of(p) for p in ROOT.rglob("*.py")}
    circles = sorted((a, b) for a, deps in graph.items() for b in deps
                     if a < b and b in graph and a in graph[b])
    assert not circles, circles
