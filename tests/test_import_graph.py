"""The package's import graph: no circle between files, no private names across modules.

Every module of `fedreid_jax` is parsed with `ast` (nothing is imported, so
this runs in a fraction of a second). Every import counts, also one inside a
function: a function-level import hides a circle from Python's import
machinery, not from the design.

- `import a.b` is an edge to module `a.b`;
- `from a import b` is an edge to module `a.b` when `b` is a module, else to
  `a` (its `__init__.py`); relative imports are resolved first;
- an import of a package's submodule is not counted as an import of the
  package's `__init__.py` (every file would then be in a circle with its
  package's `__init__`).

Private names: `from fedreid_jax.x import _name`, and `alias._name` where
`alias` is a module of the package imported into another module, are
violations. Dunder names (`__version__`) are not private.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
from pathlib import Path

PACKAGE = "fedreid_jax"
ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Edge:
  source: str  # importing module
  target: str  # imported module
  line: int


@dataclasses.dataclass
class Graph:
  files: dict[str, Path]  # module name -> file
  edges: list[Edge]
  private: list[str]  # violation messages


def module_files(root: Path, package: str) -> dict[str, Path]:
  """Every module of `package` under `root`: dotted name -> file."""
  out = {}
  for path in sorted((root / package).rglob("*.py")):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.AST) -> str | None:
  """`a.b.c` for a chain of attributes on a name, else None."""
  names = []
  while isinstance(node, ast.Attribute):
    names.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  names.append(node.id)
  return ".".join(reversed(names))


def build_graph(root: Path = ROOT, package: str = PACKAGE) -> Graph:
  files = module_files(root, package)
  modules = set(files)

  def owner(name: str) -> str | None:
    """The longest module of the package that `name` starts with."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
      if ".".join(parts[:n]) in modules:
        return ".".join(parts[:n])
    return None

  edges, private = [], []
  for module, path in files.items():
    rel = path.relative_to(root).as_posix()
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {}  # local name -> module of the package it stands for
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for item in node.names:
          target = owner(item.name)
          if target is None:
            continue
          edges.append(Edge(module, target, node.lineno))
          if item.asname:
            aliases[item.asname] = target
          else:  # `import a.b` binds `a`; `a.b._x` is resolved through dotted names
            aliases[item.name.split(".")[0]] = item.name.split(".")[0]
      elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the module's package, `level` up
          base = module.split(".") if is_package else module.split(".")[:-1]
          base = base[:len(base) - (node.level - 1)]
          source = ".".join(base + ([node.module] if node.module else []))
        else:
          source = node.module or ""
        if source != package and not source.startswith(package + "."):
          continue
        for item in node.names:
          sub = f"{source}.{item.name}"
          if sub in modules:
            edges.append(Edge(module, sub, node.lineno))
            aliases[item.asname or item.name] = sub
          else:
            target = owner(source)
            if target is not None:
              edges.append(Edge(module, target, node.lineno))
          if _is_private(item.name):
            private.append(f"{rel}:{node.lineno}: from {source} import {item.name}")
    # `alias._name` on a module of the package imported here.
    for node in ast.walk(tree):
      if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
        continue
      dotted = _dotted(node.value)
      if dotted is None:
        continue
      head, _, rest = dotted.partition(".")
      if head not in aliases:
        continue
      target = aliases[head] + ("." + rest if rest else "")
      if target in modules and target != module:
        private.append(f"{rel}:{node.lineno}: {dotted}.{node.attr} "
                       f"(private name of {target})")
  edges = [e for e in edges if e.source != e.target]
  return Graph(files, edges, private)


def strongly_connected(nodes, edges: list[Edge]) -> list[list[str]]:
  """Tarjan's strongly connected components with more than one node."""
  succ = {n: sorted({e.target for e in edges if e.source == n}) for n in nodes}
  index, low, on_stack, stack, out = {}, {}, set(), [], []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in succ[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for n in sorted(nodes):
    if n not in index:
      visit(n)
  return out


def find_cycle(component: list[str], edges: list[Edge]) -> list[Edge]:
  """One circle through the component's first module, as the edges walked."""
  members = set(component)
  succ = {}
  for e in edges:
    if e.source in members and e.target in members:
      succ.setdefault(e.source, []).append(e)
  start = component[0]
  previous, frontier = {start: None}, [start]
  while frontier:  # breadth first: the shortest way back to `start`
    nxt = []
    for v in frontier:
      for e in sorted(succ.get(v, []), key=lambda e: (e.target, e.line)):
        if e.target == start:
          path = [e]
          while previous[path[0].source] is not None:
            path.insert(0, previous[path[0].source])
          return path
        if e.target not in previous:
          previous[e.target] = e
          nxt.append(e.target)
    frontier = nxt
  return []


def describe_cycles(graph: Graph, root: Path = ROOT) -> list[str]:
  rel = lambda m: graph.files[m].relative_to(root).as_posix()
  out = []
  for component in strongly_connected(graph.files, graph.edges):
    cycle = find_cycle(component, graph.edges)
    chain = " -> ".join([rel(e.source) for e in cycle] + [rel(cycle[0].source)])
    where = "; ".join(f"{rel(e.source)}:{e.line} imports {e.target}" for e in cycle)
    out.append(f"import circle between files {chain} ({where}); "
               f"the component holds {', '.join(rel(m) for m in component)}")
  return out


@functools.lru_cache(maxsize=None)
def package_graph() -> Graph:
  return build_graph()


def test_no_import_circle_between_files():
  graph = package_graph()
  cycles = describe_cycles(graph)
  assert len(graph.files) > 10 and graph.edges  # the package was found and parsed
  assert not cycles, "\n".join(cycles)


def test_no_private_name_used_across_modules():
  private = package_graph().private
  assert not private, ("private names used across modules:\n" + "\n".join(private))


# The checker itself, on a package written for it.
def _write(root: Path, files: dict[str, str]) -> None:
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_finds_function_level_circles_and_private_names(tmp_path):
  _write(tmp_path, {
      "pkg/__init__.py": "",
      "pkg/a.py": "from pkg import b\n_x = 1\n",
      "pkg/b.py": ("def f():\n  from pkg.a import _x\n  return _x\n"
                   "def g():\n  import pkg.c as c\n  return c._y\n"),
      "pkg/c.py": "_y = 2\n",
      "pkg/sub/__init__.py": "from . import d\n",
      "pkg/sub/d.py": "from ..c import _y\nfrom pkg import a\n",
  })
  graph = build_graph(tmp_path, "pkg")
  edges = {(e.source, e.target) for e in graph.edges}
  assert {("pkg.a", "pkg.b"), ("pkg.b", "pkg.a"), ("pkg.b", "pkg.c"),
          ("pkg.sub", "pkg.sub.d"), ("pkg.sub.d", "pkg.c"), ("pkg.sub.d", "pkg.a")} <= edges
  cycles = describe_cycles(graph, tmp_path)
  assert len(cycles) == 1 and "pkg/a.py -> pkg/b.py -> pkg/a.py" in cycles[0], cycles
  assert sorted(graph.private) == [
      "pkg/b.py:2: from pkg.a import _x",
      "pkg/b.py:6: c._y (private name of pkg.c)",
      "pkg/sub/d.py:1: from pkg.c import _y",
  ], graph.private


def test_checker_accepts_a_clean_package(tmp_path):
  _write(tmp_path, {
      "pkg/__init__.py": "from pkg.a import f\n__all__ = ['f']\n",
      "pkg/a.py": "import os\nfrom pkg import b\ndef f():\n  return b.g(), b.__name__\n",
      "pkg/b.py": "def g():\n  return 1\ndef _h(x):\n  return x._private\n",
  })
  graph = build_graph(tmp_path, "pkg")
  assert not describe_cycles(graph, tmp_path) and not graph.private
