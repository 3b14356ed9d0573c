"""The project's modules import each other without a cycle, and every import is at the top of
its file, so that the dependency graph reads from the tops of the files."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {path.stem: path for path in ROOT.glob("*.py")}
SOURCES = sorted([*MODULES.values(), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tests").glob("*.py")])


def imported_modules(path: Path) -> set[str]:
    """The project modules that ``path`` imports, wherever in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found & MODULES.keys()


GRAPH = {name: sorted(imported_modules(path)) for name, path in MODULES.items()}


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
    inside = [f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}" for path in SOURCES
              for function in ast.walk(ast.parse(path.read_text()))
              if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(function) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not inside, "\n".join(inside)


if __name__ == "__main__":  # print the graph: python tests/test_imports.py
    for name, modules in sorted(GRAPH.items()):
        print(f"{name}: {', '.join(modules)}")
