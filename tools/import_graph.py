"""The import graph of the ``vq4dit`` package, read with ``ast`` (function-local imports included,
``if TYPE_CHECKING:`` blocks excluded): its cycles and its imports from a lower layer to a higher one.

    python tools/import_graph.py          # prints the layers, the edges that break them, the cycles

Layers, lowest first (a module may import its own layer and the ones below, never one above):
``LAYERS``. Every module of the package must be listed (a new module must be placed). The package
``vq4dit/__init__.py`` is the top: no module imports it. ``tests/test_import_graph.py`` asserts
no cycle and no upward import.
"""

from __future__ import annotations

import ast
import fnmatch
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vq4dit"

# lowest first; patterns on dotted module names
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("math", ("vq4dit._version", "vq4dit.vq_config", "vq4dit.codewords", "vq4dit.kmeans", "vq4dit.soft",
              "vq4dit.decoding", "vq4dit.kernels", "vq4dit.kernels.*", "vq4dit.packing", "vq4dit.error_feedback", "vq4dit.assignment",
              "vq4dit.atomic", "vq4dit.write_faults", "vq4dit.metrics", "vq4dit.sampling", "vq4dit.flow_matching", "vq4dit.images", "vq4dit.baselines",
              "vq4dit.typed_settings")),
    ("models", ("vq4dit.families", "vq4dit.families.*", "vq4dit.convert", "vq4dit.models", "vq4dit.prompts",
                "vq4dit.prompts.*")),  # model families, DiT loading, prompt embeddings
    ("layers", ("vq4dit.layers", "vq4dit.quantize", "vq4dit.size", "vq4dit.distributed")),
    ("io", ("vq4dit.io", "vq4dit.io.*", "vq4dit.export")),  # vq4dit.export: old import path, re-exports only
    ("evaluation", ("vq4dit.reference", "vq4dit.rgb_reference", "vq4dit.pixart_reference", "vq4dit.mmdit_reference", "vq4dit.evaluation", "vq4dit.trajectories")),
    ("engine", ("vq4dit.engine", "vq4dit.engine.*", "vq4dit.recipes")),
    ("lightning", ("vq4dit.lightning", "vq4dit.lightning.*")),
    ("package", ("vq4dit",)),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (module level or in functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from X import Y`: Y may be a submodule of X
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import vq4dit.io.packed.x` -> the module it names
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def layer_of(name: str) -> int | None:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            return rank
    return None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import of a higher layer's module ``b`` by ``a``, and unplaced modules."""
    problems = [f"{name}: not placed in a layer (tools/import_graph.py LAYERS)" for name in edges if layer_of(name) is None]
    for name, targets in sorted(edges.items()):
        for target in sorted(targets):
            low, high = layer_of(name), layer_of(target)
            if low is not None and high is not None and high > low:
                problems.append(f"{name} ({LAYERS[low][0]}) -> {target} ({LAYERS[high][0]})")
    return problems


def main() -> int:
    edges = graph()
    for rank, (layer, _) in enumerate(LAYERS):
        members = sorted(name for name in edges if layer_of(name) == rank)
        print(f"{layer:<11} {', '.join(members)}")
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports")
    bad, loops = upward_imports(edges), cycles(edges)
    for line in bad:
        print("upward:", line)
    for loop in loops:
        print("cycle:", " <-> ".join(loop))
    print("ok: no cycle, no upward import" if not bad and not loops else "FAILED")
    return 1 if bad or loops else 0


if __name__ == "__main__":
    raise SystemExit(main())
