"""The project's modules import each other without a cycle, and only at the top of a file."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {path.stem: path for path in ROOT.glob("*.py")}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(project module, whether the import is inside a function) for each import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        for inner in ast.walk(node) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else ():
            if isinstance(inner, (ast.Import, ast.ImportFrom)):
                inner.in_function = True
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(name, getattr(node, "in_function", False)) for name in names if name in MODULES]
    return found


GRAPH = {name: sorted({module for module, _ in imports(path)}) for name, path in MODULES.items()}


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


def test_project_modules_are_imported_at_the_top_of_files():
    inside = [f"{name}.py imports {module} in a function" for name, path in sorted(MODULES.items())
              for module, in_function in imports(path) if in_function]
    assert not inside, "\n".join(inside)


if __name__ == "__main__":  # print the graph: python tests/test_imports.py
    for name, modules in sorted(GRAPH.items()):
        print(f"{name}: {', '.join(modules)}")
