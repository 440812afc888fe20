"""The layers stay layers: core -> backends -> queue/worker -> sync/cli -> notebook.

Checked twice: in a fresh interpreter (what importing a module really loads) and
on the source, every import statement including those inside functions, which a
look at ``sys.modules`` misses until the function runs (``Result._repr_html_``
once imported the notebook layer that way).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import sitq

PACKAGE = Path(sitq.__file__).parent
NOTEBOOK_PACKAGES = ("IPython", "ipywidgets", "rich", "sitq.notebook")
# The worker's modules, lowest first: each may import only those before it.
WORKER_ORDER = (
    "sitq.worker.capture", "sitq.worker.failures", "sitq.worker.processes", "sitq.worker.runners",
    "sitq.worker.loop", "sitq.worker",
)
BESIDE_OR_ABOVE_THE_WORKER = ("sitq.queue", "sitq.sync", "sitq.cli", "sitq.demo", "sitq.notebook")
# `%load_ext sitq` looks for these in the top-level package; they load the notebook layer.
EXTENSION_HOOKS = {("sitq", "load_ipython_extension"), ("sitq", "unload_ipython_extension")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str) -> list[tuple[str, int, str]]:
    """(imported module, line, enclosing function or "") for every import in ``module``'s source,
    also inside functions and ``if TYPE_CHECKING:``. ``from a import b`` names ``a.b`` if that is
    a module of sitq (a submodule, not a name from the package's ``__init__``), else ``a``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, function or child.name)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                for alias in child.names:
                    target = f"{base}.{alias.name}"
                    found.append((target if target in MODULES else base, child.lineno, function))
            visit(child, function)

    visit(ast.parse(path.read_text(encoding="utf-8")), "")
    return found


def within(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


@pytest.mark.parametrize("module", ["sitq.core", "sitq.queue", "sitq.worker", "sitq.sync"])
def test_headless_modules_load_nothing_of_the_notebook_layer(module):
    code = (
        f"import sys, {module}\n"
        f"print([m for m in sys.modules if m.split('.')[0] in {NOTEBOOK_PACKAGES[:3]!r}"
        f" or m.startswith('sitq.notebook')])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing {module} loaded {out.stdout.strip()}"


def test_nothing_below_the_notebook_layer_imports_it_even_lazily():
    offending = [
        f"{module}:{line} imports {name}" + (f" (in {function}())" if function else "")
        for module in MODULES
        if not within(module, ["sitq.notebook"])
        for name, line, function in imports(module)
        if within(name, NOTEBOOK_PACKAGES)
        and (module, function) not in EXTENSION_HOOKS
        and not (module in ("sitq.cli", "sitq.terminal") and name.startswith("rich") and function)  # terminal views
    ]
    assert offending == []


def test_worker_modules_import_only_the_ones_below_them():
    offending = []
    for module in (m for m in MODULES if within(m, ["sitq.worker"])):
        assert module in WORKER_ORDER, f"{module} is new: add it to WORKER_ORDER, above what it imports"
        below = WORKER_ORDER[: WORKER_ORDER.index(module)]
        for name, line, _ in imports(module):
            if (within(name, ["sitq.worker"]) and name not in below) or within(name, BESIDE_OR_ABOVE_THE_WORKER):
                offending.append(f"{module}:{line} imports {name}")
    assert offending == []


def test_imports_go_one_way():
    """No circle of imports between sitq's modules, counting lazy and type-checking imports:
    one found here is a module that needs another which needs it back."""
    graph = {module: {name for name, _, _ in imports(module) if name in MODULES} - {module} for module in MODULES}
    circles = []
    state = {}  # module -> "open" while its imports are walked, "done" after

    def walk(module, path):
        state[module] = "open"
        for name in sorted(graph[module]):
            if state.get(name) == "open":
                circles.append(" -> ".join(path[path.index(name):] + [name]))
            elif name not in state:
                walk(name, path + [name])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert circles == []
