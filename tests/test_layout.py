"""The package's structure, read from its imports (`ast`, nothing is run): the rooms keep their
rules. `layers/` imports nothing of megatron_lora outside it, `interop/` no megatron-core, no
module imports one that imports it back (directly or around a circle), and at most six modules
lie at `megatron_lora/`'s top level; `engine_servers/` imports no torch and none of the library."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("megatron_lora", "megatron_cpu", "fsdp_lora", "lora_common", "engine_servers")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """{module: the modules of this project it imports, at any depth of its code}."""
    modules = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import module` names the module; `from module import name`, the
                # module that defines the name
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                           else node.module for alias in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_layers_import_nothing_of_megatron_lora_outside_layers():
    for module, imported in _imports().items():
        if module.startswith("megatron_lora.layers"):
            outside = {m for m in imported if m.startswith("megatron_lora.")
                       and not m.startswith("megatron_lora.layers")}
            assert not outside, f"{module} imports {sorted(outside)}"


def test_interop_imports_no_megatron_core():
    for path in (ROOT / "megatron_lora" / "interop").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in ("megatron", "transformer_engine")
                        or n.startswith(("megatron_lora.layers", "megatron_lora.sync"))], path


def test_engine_servers_import_no_torch_and_nothing_of_the_library():
    # they start engines in processes of their own (the RL demo and the tests run them beside a
    # trainer); `sitecustomize/` is not imported here but by the server it is put beside
    for path in (ROOT / "engine_servers").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in (
                "torch", "megatron", "megatron_lora", "megatron_cpu", "fsdp_lora",
                "lora_common")], path


def test_no_import_circle():
    graph = _imports()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for nxt in sorted(graph[module]):
            if state.get(nxt) == "open":
                circle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_at_most_six_modules_at_the_top_of_megatron_lora():
    top = sorted(p.name for p in (ROOT / "megatron_lora").glob("*.py"))
    assert len(top) <= 6, top
