"""The project's modules import each other without a cycle, and every import is at the top of
its file, so that the dependency graph reads from the tops of the files.

An import is an ``import`` statement or a call to ``importlib.import_module``: both are edges
of the graph and neither may sit inside a function. Import statements come before any other
module-level code; a module-level ``import_module`` call may follow the names it reads (the
one there is, ``reproduce.SCRIPTS``, imports the method scripts that ``config.METHODS`` names).
``python tests/test_imports.py`` prints the graph and runs these checks (exit status 1 on a
violation).
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


PACKAGES = ("analysis", "benchmarks", "databases", "perturbations", "plumbing", "training")  # the package folders of the repository root


def module_name(path: Path) -> str:
    """The name the file is imported under: <package>.<stem> in a package folder (the package's
    own name for its __init__.py), the stem for the repository root and tests/ (both on sys.path
    when tests run)."""
    if path.parent.name not in PACKAGES:
        return path.stem
    return path.parent.name if path.stem == "__init__" else f"{path.parent.name}.{path.stem}"


SOURCES = sorted([*ROOT.glob("*.py"), *(ROOT / "tests").glob("*.py"),
                  *(path for package in PACKAGES for path in (ROOT / package).glob("*.py"))])
MODULES = {module_name(path): path for path in SOURCES}
assert len(MODULES) == len(SOURCES), "two files import under the same name"
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}
# The scripts of config.METHODS (method name -> Method(script module, ...)), read from config.py's
# text so that this check imports none of the modules it checks
METHOD_SCRIPTS = next({ast.literal_eval(method.args[0]) for method in statement.value.values}
                      for statement in TREES["config"].body
                      if isinstance(statement, ast.Assign) and ast.unparse(statement.targets[0]) == "METHODS")


def is_import_module(node: ast.AST) -> bool:
    """A call of importlib.import_module (as ``importlib.import_module`` or ``import_module``)."""
    return isinstance(node, ast.Call) and (
        isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
        and isinstance(node.func.value, ast.Name) and node.func.value.id == "importlib"
        or isinstance(node.func, ast.Name) and node.func.id == "import_module")


def with_parents(tree: ast.AST) -> ast.AST:
    """The tree, each node given its parent (``node.parent``)."""
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            child.parent = parent
    return tree


def import_module_targets(call: ast.Call) -> set[str] | None:
    """The modules an import_module call can import: its literal argument, or, when the argument
    or the comprehension around the call reads config.METHODS (the one map of method names to
    script names), every method script; None for any other argument (this check cannot read it)."""
    argument = call.args[0] if call.args else None
    if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
        return {argument.value}
    read = [argument] if argument else []
    node = call
    while hasattr(node, "parent"):
        node = node.parent
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            read += [generator.iter for generator in node.generators]
    if any(isinstance(n, ast.Name) and n.id == "METHODS" or isinstance(n, ast.Attribute) and n.attr == "METHODS"
           for expression in read for n in ast.walk(expression)):
        return METHOD_SCRIPTS
    return None


UNREADABLE = []  # "path:line: call" of each import_module call whose module this check cannot read


def with_packages(names: set[str]) -> set[str]:
    """The names and the packages above them (importing plumbing.flags imports plumbing first)."""
    return {".".join(parts[:end]) for parts in (name.split(".") for name in names) for end in range(1, len(parts) + 1)}


def imported_modules(name: str, tree: ast.AST) -> set[str]:
    """The project modules that the module imports, wherever in the file."""
    found = set()
    for node in ast.walk(with_parents(tree)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # from plumbing import x
        elif is_import_module(node):
            targets = import_module_targets(node)
            if targets is None:
                UNREADABLE.append(f"{MODULES[name].relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
            found.update(targets or ())
    return with_packages(found) & MODULES.keys()


GRAPH = {name: sorted(imported_modules(name, tree)) for name, tree in TREES.items()}


def test_every_import_module_call_names_its_modules():
    """A graph without the modules a call imports could hide a cycle."""
    assert not UNREADABLE, "import_module of a name this check cannot read (a literal or a script of " \
                           "config.METHODS):\n" + "\n".join(UNREADABLE)


def test_no_import_cycle():
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name not in done:
            path.append(name)
            for module in GRAPH[name]:
                visit(module)
            path.pop()
            done.add(name)

    for name in sorted(GRAPH):
        visit(name)


def test_no_import_inside_a_function():
    inside = [f"{MODULES[name].relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"
              for name, tree in TREES.items()
              for function in ast.walk(tree)
              if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
              for node in ast.walk(function)
              if isinstance(node, (ast.Import, ast.ImportFrom)) or is_import_module(node)]
    assert not inside, "\n".join(inside)


def is_import_block(statement: ast.stmt) -> bool:
    """Import statements, and the blocks that hold only imports: ``if TYPE_CHECKING:`` (names for
    annotations, never imported when running), ``try: import x / except ImportError:`` (a package
    that may be missing) and ``with warnings.catch_warnings():`` with warnings filters (a package
    whose import warns about its own dependencies, as wfdb does in tests/test_cpsc2018.py)."""
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return True
    if isinstance(statement, ast.If):
        return (ast.unparse(statement.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING") and not statement.orelse
                and all(is_import_block(s) for s in statement.body))
    if isinstance(statement, ast.Try):
        return (all(is_import_block(s) for s in statement.body) and bool(statement.handlers)
                and all(handler.type is not None
                        and ast.unparse(handler.type) in ("ImportError", "ModuleNotFoundError")
                        for handler in statement.handlers))
    if isinstance(statement, ast.With):
        return ([ast.unparse(item.context_expr) for item in statement.items] == ["warnings.catch_warnings()"]
                and all(is_import_block(s) or isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)
                        and ast.unparse(s.value.func) in ("warnings.simplefilter", "warnings.filterwarnings")
                        for s in statement.body))
    return False


def may_precede_imports(name: str, statement: ast.stmt) -> bool:
    """Module-level code allowed above imports: the docstring, and two calls that must run before
    the imports below them: matplotlib.use in analysis/figures.py (the backend is chosen before pyplot is
    imported), and sys.path.insert in the files run as scripts from a folder below the repository
    root (the benchmarks; tests/ddp_worker.py, run by torchrun), which import the root's modules."""
    if not isinstance(statement, ast.Expr):
        return False
    if isinstance(statement.value, ast.Constant) and isinstance(statement.value.value, str):
        return True
    call = ast.unparse(statement.value.func) if isinstance(statement.value, ast.Call) else ""
    return (call == "matplotlib.use" and name == "analysis.figures"
            or call == "sys.path.insert" and (name.startswith("benchmarks.") or name in ("ddp_worker", "databases.synthetic")))


def imports_outside_functions(node: ast.AST):
    """The import statements in ``node`` that run when the module is imported (not in a function)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        for child in ast.iter_child_nodes(node):
            yield from imports_outside_functions(child)


def test_imports_come_before_other_module_level_code():
    late = []
    for name, tree in TREES.items():
        code_seen = False
        for statement in tree.body:
            if is_import_block(statement):
                if code_seen:
                    late.append(f"{MODULES[name].relative_to(ROOT)}:{statement.lineno}: {ast.unparse(statement)}")
            elif not may_precede_imports(name, statement):
                # an import inside other module-level code (if, for, with ...) runs after that code
                late += [f"{MODULES[name].relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"
                         for node in imports_outside_functions(statement)]
                code_seen = True
    assert not late, "imports after module-level code:\n" + "\n".join(late)


def test_the_packages_name_each_module_and_import_nothing():
    """Each package's __init__.py is its folder's table of contents: a line
    "- <module>: <purpose>" for each of its modules, and no import (a module of it imports only
    what it needs)."""
    for package in ("analysis", "databases", "perturbations", "plumbing", "training"):
        listed = {line[2:].split(":")[0] for line in ast.get_docstring(TREES[package]).splitlines()
                  if line.startswith("- ")}
        assert listed == {path.stem for path in (ROOT / package).glob("*.py")} - {"__init__"}, package
        assert len(TREES[package].body) == 1, f"{package}/__init__.py holds more than its docstring"


def main() -> int:
    """Print the graph, then run the checks: 1 if any fails."""
    for name, modules in sorted(GRAPH.items()):
        print(f"{name}: {', '.join(modules)}")
    failed = 0
    for check in (test_every_import_module_call_names_its_modules, test_no_import_cycle,
                  test_no_import_inside_a_function, test_imports_come_before_other_module_level_code,
                  test_the_packages_name_each_module_and_import_nothing):
        try:
            check()
        except AssertionError as error:
            print(f"FAILED {check.__name__}: {error}", file=sys.stderr)
            failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main())
