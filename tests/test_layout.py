"""The package's shape: no import cycle, short functions, stdout only from the CLI.

Static checks over the source of ``pamjax/`` (ast, nothing is imported):

* the import graph of pamjax's modules, function-level imports included, has no cycle. An
  edge goes from a module to every pamjax module it imports (``from pamjax.learn import
  judge`` is an edge to ``pamjax.learn.judge``, ``from pamjax.simulation import stack`` to
  ``pamjax.simulation``). The implicit import of a parent package's ``__init__`` is not an
  edge (every submodule import runs it, so counting it would make the public API's
  ``__init__`` a cycle with every module it re-exports), and imports under
  ``if TYPE_CHECKING:`` are not edges (they never run);
* no function is over MAX_FUNCTION_LINES lines (from ``def`` to its last line, nested
  functions counted in their parent too) except the at most two of ALLOWED_LONG;
* only the CLI prints to stdout: any other ``print`` goes to ``sys.stderr`` (progress), so
  library functions return data and the commands print it;
* every ``pamjax...`` import in the package, the tests and the experiments names a module of
  this checkout (an editable install elsewhere could otherwise answer a stale path).
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pamjax"
MAX_FUNCTION_LINES = 100
ALLOWED_LONG: set[str] = set()
"""Functions allowed over MAX_FUNCTION_LINES (module path relative to pamjax, dotted)."""


def _modules() -> dict[str, ast.Module]:
    """Dotted module name -> parsed source, for every .py file of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = ast.parse(path.read_text(), filename=str(path))
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node of ``tree`` at any depth, outside TYPE_CHECKING blocks."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        if _is_type_checking(child):
            for other in child.orelse:
                yield from _imports(other)
            continue
        yield from _imports(child)


def import_graph() -> dict[str, set[str]]:
    """pamjax module -> the pamjax modules it imports (see the module docstring)."""
    modules = _modules()
    graph = {}
    for name, tree in modules.items():
        edges = set()
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                # pamjax imports absolutely (test_imports_are_absolute), so node.module is
                # the full dotted name.
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else node.module for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def function_lengths() -> dict[str, int]:
    """``module.function`` (nested: ``module.outer.inner``, methods ``module.Class.f``,
    module relative to pamjax) -> lines from ``def`` to its end."""
    lengths = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lengths[name] = child.end_lineno - child.lineno + 1
                walk(child, name)
            else:
                walk(child, prefix)

    for module, tree in _modules().items():
        walk(tree, module.removeprefix("pamjax").removeprefix("."))
    return lengths


def test_the_import_graph_is_read():
    graph = import_graph()
    # A few known edges, function-level ones included (cli imports lazily), so that an
    # empty graph cannot pass the cycle test.
    assert "pamjax.studies.sweep" in graph["pamjax.cli"]
    assert "pamjax.learn.judge" in graph["pamjax.learn.train"]
    assert "pamjax.simulation" in graph["pamjax.studies.study"]
    assert "pamjax.learn.train" not in graph["pamjax.learn.judge"]  # TYPE_CHECKING only
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_are_absolute():
    relative = [f"{name}:{node.lineno}" for name, tree in _modules().items()
                for node in _imports(tree) if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative, f"relative imports (the graph reads absolute ones): {relative}"


def test_every_pamjax_import_resolves():
    modules = _modules()
    root = PACKAGE.parent
    sources = [*(root / "tests").glob("*.py"), *(root / "experiments").glob("*.py")]
    trees = {**{name: tree for name, tree in modules.items()},
             **{str(path.relative_to(root)): ast.parse(path.read_text()) for path in sources}}
    stale = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module]
            else:
                continue
            stale += [f"{name}:{node.lineno} {t}" for t in targets
                      if t.split(".")[0] == "pamjax" and t not in modules]
    assert not stale, f"imports of modules that do not exist: {stale}"


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_functions_fit_in_100_lines():
    assert len(ALLOWED_LONG) <= 2
    lengths = function_lengths()
    assert lengths["cli.build_parser"] > 5  # the walk finds functions where they are
    assert ALLOWED_LONG <= set(lengths), ALLOWED_LONG - set(lengths)
    long = {name: n for name, n in lengths.items()
            if n > MAX_FUNCTION_LINES and name not in ALLOWED_LONG}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_only_the_cli_prints_to_stdout():
    offenders = []
    for module, tree in _modules().items():
        if module == "pamjax.cli":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                target = next((k.value for k in node.keywords if k.arg == "file"), None)
                if not (isinstance(target, ast.Attribute) and target.attr == "stderr"):
                    offenders.append(f"{module}:{node.lineno}")
    assert not offenders, f"print to stdout outside pamjax.cli: {offenders}"
