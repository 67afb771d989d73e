"""The house's layout: no import cycle inside pipespec, dependencies point one way (docs/architecture.md), and every
module imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pipespec

ROOT = Path(pipespec.__file__).parent

# The layers, lowest first; a module may import its own layer and those below it. ``analysis`` is pure and sits
# just above the shared vocabulary; ``cli`` is the top.
LAYERS = [
    {"errors", "types", "verify", "channels", "loading", "placement", "prompts", "tracing", "__init__"},
    {"analysis"},
    {"kernels"},
    {"workers"},
    {"runners"},
    {"stages"},
    {"scheduler"},
    {"apps"},
    {"cli", "__main__"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["pipespec", *parts])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every pipespec module ``name`` imports, at any depth of its code (lazy and TYPE_CHECKING imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.add(full if full in known else target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def test_no_import_cycles() -> None:
    graph = _graph()
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> None:
        if node in path:
            cycle = path[path.index(node):] + [node]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            # a package's __init__ importing its own submodules is how packages re-export: not a cycle
            if not nxt.startswith(node + "."):
                visit(nxt)
        path.pop()
        done.add(node)

    for module in sorted(graph):
        visit(module)


def test_dependencies_point_one_way() -> None:
    graph = _graph()
    wrong = [f"{a} imports {b}" for a, deps in graph.items() for b in deps
             if a != "pipespec" and _layer(b) > _layer(a)]
    assert not wrong, wrong


# modules that need an optional dependency (absent from CI): checked only where it is installed
OPTIONAL = {"pipespec.kernels.triton_gemv": "triton", "pipespec.kernels.triton_attention": "triton",
            "pipespec.kernels.triton_elementwise": "triton", "pipespec.kernels.triton_wgemm": "triton"}


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    import importlib.util

    mods = [m for m in _modules() if not m.endswith("__main__")
            and (m not in OPTIONAL or importlib.util.find_spec(OPTIONAL[m]) is not None)]
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % (mods,)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
