"""The library's import graph: every `ddpm` module's imports of other `ddpm` modules (at module
level or inside functions) form a DAG, so each module can be read on top of the ones it uses."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module_name(path):
  rel = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _ddpm_imports(path, modules):
  """The ddpm modules imported anywhere in the file at `path`."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from pkg import submodule` depends on the submodule; `from pkg import name` on pkg.
      subs = [f"{node.module}.{a.name}" for a in node.names]
      names = [n if n in modules else node.module for n in subs]
    else:
      continue
    out.update(n for n in names if n in modules)
  return out


def import_graph():
  paths = glob.glob(os.path.join(ROOT, "ddpm", "**", "*.py"), recursive=True)
  modules = {_module_name(p): p for p in paths}
  graph = {}
  for name, path in modules.items():
    # A package's own __init__ is imported by its submodules implicitly: not an edge.
    graph[name] = {m for m in _ddpm_imports(path, modules) if m != name}
  return graph


def _find_cycle(graph):
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_import_graph_has_no_cycle():
  graph = import_graph()
  assert "ddpm.train" in graph and "ddpm.experiment" in graph["ddpm.train"]
  cycle = _find_cycle(graph)
  assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b"}, "b": set()}) is None
