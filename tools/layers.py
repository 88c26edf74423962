"""The layer-graph check: print aclip's package graph and fail on a broken house rule.

Reads every ``import`` of aclip/, evals/ and train.py with ``ast`` (imports inside functions and
``if TYPE_CHECKING:`` blocks included; standard library only), prints which package imports which
(with the number of import statements), and exits 1 naming each broken rule:

- ``upward import``: a module imports a package of a higher rank in ``LAYERS``;
- ``same-rank import``: two different packages of one rank (data and model, eval and interop,
  studies and bench, evals and train.py, ...) unless listed in ``SAME_RANK_ALLOWED``;
- ``aclip imports an entry point``: a module under aclip/ imports evals, train or aclip.export;
- ``package cycle`` / ``module cycle``: a cycle between packages, or between the modules of one
  package (imports under ``if TYPE_CHECKING:`` do not run, so they do not close a cycle);
- ``long module``: an aclip/, evals/ or train.py module over ``MAX_MODULE_LINES`` lines;
- ``long command``: an evals/ command line over ``MAX_COMMAND_LINES`` lines (over
  ``WARN_COMMAND_LINES`` it only warns: the issue's "about 150" is a target, and a command a
  few help lines past it is not a defect; a third over it is library code left in a command);
- ``unlisted package``: a module under aclip/ that belongs to no package of ``LAYERS``;
- ``unreadable module``: a file that does not parse.

Usage: ``python tools/layers.py [--root REPO]`` (``make layers``).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The layers, lowest first: a package may import packages of a lower rank only.
LAYERS: dict[str, int] = {
    "aclip": 0,  # the package root (aclip/__init__.py), kept import-free
    "aclip.config": 0,
    "aclip.tokenizer": 0,
    "aclip.distributed": 0,
    "aclip.data": 1,
    "aclip.model": 1,
    "aclip.methods": 2,
    "aclip.eval": 3,
    "aclip.interop": 3,
    "aclip.dense": 4,
    "aclip.train": 5,
    "aclip.studies": 6,
    "aclip.bench": 6,
    "evals": 7,
    "train": 7,
    "aclip.export": 7,  # a forwarder kept so `python -m aclip.export` works: an entry point
}
ENTRY_POINTS = ("evals", "train", "aclip.export")
# (importer, imported) pairs of one rank that may import each other: none so far.
SAME_RANK_ALLOWED: frozenset[tuple[str, str]] = frozenset()
MAX_MODULE_LINES = 500  # aclip/, evals/ and train.py
WARN_COMMAND_LINES = 150  # evals/*.py: warn above
MAX_COMMAND_LINES = 200  # evals/*.py: fail above
SOURCES = ("aclip", "evals", "train.py")


@dataclass(frozen=True)
class Import:
    """One imported first-party module, as written in ``importer`` at ``line``."""

    importer: str
    target: str
    line: int
    runs: bool  # False under `if TYPE_CHECKING:` (never executed)


@dataclass
class Tree:
    """The modules of a source tree: name -> file, line counts and their imports."""

    root: Path
    files: dict[str, Path] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def module_name(root: Path, path: Path) -> str:
    """``aclip/methods/__init__.py`` -> ``aclip.methods``; ``train.py`` -> ``train``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path) -> Iterator[Path]:
    """The Python files of ``SOURCES`` under ``root`` (those that exist), sorted."""
    for source in SOURCES:
        path = root / source
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)


def package_of(module: str) -> str | None:
    """The ``LAYERS`` package a module belongs to (the longest listed prefix), or None.

    ``aclip`` itself stands for aclip/__init__.py only: aclip's modules belong to its packages.
    """
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS and (prefix != "aclip" or module == "aclip"):
            return prefix
    return None


def is_first_party(module: str) -> bool:
    """True for modules of aclip, evals and train.py."""
    return module.split(".")[0] in {Path(s).stem for s in SOURCES}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the statements inside ``if TYPE_CHECKING:`` blocks."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                inside.update(id(n) for n in ast.walk(stmt))
    return inside


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module a (possibly relative) ``from`` import names."""
    if level == 0:
        return name or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> Iterator[str]:
    """The modules one import statement imports (``from pkg import submodule`` -> submodule)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = _absolute(module, is_package, node.level, node.module)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            yield sub if sub in known else base


def read_tree(root: Path) -> Tree:
    """Parse every source module under ``root``: its line count and first-party imports."""
    tree = Tree(root)
    for path in source_files(root):
        tree.files[module_name(root, path)] = path
    known = set(tree.files)
    for module, path in tree.files.items():
        text = path.read_text(encoding="utf-8", errors="replace")
        tree.lines[module] = len(text.splitlines())
        try:
            syntax = ast.parse(text, filename=str(path))
        except SyntaxError:
            tree.unreadable.append(module)
            continue
        skipped = _type_checking_nodes(syntax)
        is_package = path.name == "__init__.py"
        for node in ast.walk(syntax):
            for target in _targets(node, module, is_package, known):
                if is_first_party(target):
                    runs = id(node) not in skipped
                    tree.imports.append(Import(module, target, node.lineno, runs))
    return tree


def package_edges(tree: Tree) -> Counter[tuple[str, str]]:
    """(importer package, imported package) -> number of imports, between different packages."""
    edges: Counter[tuple[str, str]] = Counter()
    for imp in tree.imports:
        src, dst = package_of(imp.importer), package_of(imp.target)
        if src and dst and src != dst:
            edges[src, dst] += 1
    return edges


def cycles(nodes: Iterable[str], edges: Iterable[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst in edges:
        if src != dst:
            graph[src].add(dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
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
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(set(nodes) | set(graph)):
        if node not in index:
            visit(node)
    return sorted(found)


def layer_violations(tree: Tree) -> list[str]:
    """Upward, same-rank and aclip-to-entry-point imports, one line per import."""
    found = []
    for imp in tree.imports:
        src, dst = package_of(imp.importer), package_of(imp.target)
        if not src or not dst or src == dst:
            continue
        path = tree.files[imp.importer].relative_to(tree.root)
        where = f"{path}:{imp.line} imports {imp.target}"
        if imp.importer.split(".")[0] == "aclip" and dst in ENTRY_POINTS:
            found.append(f"aclip imports an entry point: {where} ({src} -> {dst})")
        elif LAYERS[dst] > LAYERS[src]:
            found.append(
                f"upward import: {where} ({src}, rank {LAYERS[src]} -> {dst}, rank {LAYERS[dst]})"
            )
        elif LAYERS[dst] == LAYERS[src] and (src, dst) not in SAME_RANK_ALLOWED:
            found.append(f"same-rank import: {where} ({src} -> {dst}, rank {LAYERS[src]})")
    return found


def cycle_violations(tree: Tree) -> list[str]:
    """Cycles between packages, and between the modules of one package (executed imports)."""
    running = [imp for imp in tree.imports if imp.runs]
    pkg_edges = {
        (package_of(i.importer), package_of(i.target))
        for i in running
        if package_of(i.importer) and package_of(i.target)
    }
    found = [f"package cycle: {' <-> '.join(c)}" for c in cycles(LAYERS, pkg_edges)]
    mod_edges = {
        (i.importer, i.target)
        for i in running
        if i.target in tree.files and package_of(i.importer) == package_of(i.target)
    }
    found += [f"module cycle: {' <-> '.join(c)}" for c in cycles(tree.files, mod_edges)]
    return found


def size_violations(tree: Tree) -> tuple[list[str], list[str]]:
    """(failures, warnings) for modules and evals/ command lines over their line limits."""
    failures, warnings = [], []
    for module, count in sorted(tree.lines.items()):
        rel = tree.files[module].relative_to(tree.root)
        if module.split(".")[0] == "evals" and module != "evals":
            if count > MAX_COMMAND_LINES:
                failures.append(f"long command: {rel} has {count} lines (> {MAX_COMMAND_LINES})")
            elif count > WARN_COMMAND_LINES:
                warnings.append(f"long command: {rel} has {count} lines (> {WARN_COMMAND_LINES})")
        elif count > MAX_MODULE_LINES:
            failures.append(f"long module: {rel} has {count} lines (> {MAX_MODULE_LINES})")
    return failures, warnings


def check(tree: Tree) -> tuple[list[str], list[str]]:
    """Every broken rule of ``tree`` (failures) and the warnings."""
    failures = [f"unreadable module: {m}" for m in tree.unreadable]
    failures += [
        f"unlisted package: {m} belongs to no package of LAYERS"
        for m in sorted(tree.files)
        if package_of(m) is None
    ]
    failures += layer_violations(tree) + cycle_violations(tree)
    sizes, warnings = size_violations(tree)
    return failures + sizes, warnings


def graph_lines(tree: Tree) -> list[str]:
    """The package graph, lowest rank first: package -> imported packages (import counts)."""
    edges = package_edges(tree)
    modules = Counter(package_of(m) for m in tree.files)
    out = []
    for pkg in sorted(LAYERS, key=lambda p: (LAYERS[p], p)):
        if not modules[pkg]:
            continue
        deps = sorted((d for s, d in edges if s == pkg), key=lambda d: (LAYERS[d], d))
        listed = ", ".join(f"{d} ({edges[pkg, d]})" for d in deps) or "-"
        out.append(f"  [{LAYERS[pkg]}] {pkg} ({modules[pkg]} modules) -> {listed}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the graph, the warnings and the broken rules; 1 if any rule is broken."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    root = parser.parse_args(argv).root.resolve()
    tree = read_tree(root)
    failures, warnings = check(tree)
    print(f"package graph of {root} (package -> packages it imports, with import counts):")
    print("\n".join(graph_lines(tree)))
    for line in warnings:
        print(f"warning: {line}")
    for line in failures:
        print(f"error: {line}")
    print(f"{len(failures)} broken rule(s), {len(warnings)} warning(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
