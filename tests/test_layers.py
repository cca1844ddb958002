"""The package's layers hold: every import (at the top or inside a function) points down the architecture,
and no modules import each other in a circle.

    core        settings, configs, errors, the manifest format, rank math        ropesp/*.py (below)
    model       the DiT, its checkpoints, the decoders, text encoders, the demo world   ropesp/model, decode
    plugins     the custom ops and kernels                                       plugins/ (ropesp.plugins)
    export      traced segments and engine builders                              export/ (ropesp.export)
    runtime     ranks, executors, sessions, the engine core                      runtime/ (ropesp.runtime)
    front ends  the CLI, ropesp.Pipeline, the Triton model, the web demo, bench  ropesp/cli, api, serving, ...

A layer imports its own and the layers it builds on: the runtime never imports the exporter (it reads
engine directories through the core's manifest format), and nothing imports the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ropesp": ROOT / "ropesp", "ropesp.plugins": ROOT / "plugins", "ropesp.export": ROOT / "export"}
PACKAGES["ropesp.runtime"] = ROOT / "runtime"

CORE = {
    "ropesp",
    "ropesp.errors",
    "ropesp.dtypes",
    "ropesp.settings",
    "ropesp.config",
    "ropesp.limits",
    "ropesp.parallel",
    "ropesp.manifest",
    "ropesp.extras",
    "ropesp.flops",
    "ropesp.processes",
}
FRONT_ENDS = ("ropesp.cli", "ropesp.api", "ropesp.serving", "ropesp.webdemo", "ropesp.bench", "ropesp.video")
FRONT_ENDS += ("ropesp.run_status", "ropesp.start_gc", "ropesp.demo.train", "ropesp.demo.evaluate")
FRONT_ENDS += ("ropesp.demo.long_stream",)
LAYERS = ("core", "model", "plugins", "export", "runtime", "front ends")
MAY_IMPORT = {
    "core": {"core"},
    "model": {"core", "model"},
    "plugins": {"core", "model", "plugins"},
    "export": {"core", "model", "plugins", "export"},
    "runtime": {"core", "model", "plugins", "runtime"},
    "front ends": set(LAYERS),
}


def layer(module: str) -> str:
    if module in CORE:
        return "core"
    if any(module == f or module.startswith(f + ".") for f in FRONT_ENDS):
        return "front ends"
    for name in ("plugins", "export", "runtime"):
        if module == f"ropesp.{name}" or module.startswith(f"ropesp.{name}."):
            return name
    return "model"  # ropesp.model, ropesp.decode, text_encoder, model_dir, the demo world and its encoder


def modules() -> dict[str, Path]:
    found = {}
    for package, directory in PACKAGES.items():
        for path in directory.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(directory).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "ropesp" and parts and parts[0] in ("plugins", "export", "runtime"):
                continue
            found[".".join([package, *parts])] = path
    return found


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The ropesp modules `module` imports, anywhere in its source."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rsplit(".", 1)[0] if "." in name else ""
            if name and name != module:
                found.add(name)
    return found


GRAPH = {m: imports(m, p, set(modules())) for m, p in modules().items()}


def test_every_module_has_a_layer():
    assert {layer(m) for m in GRAPH} == set(LAYERS)
    assert "ropesp.runtime.engine_core" in GRAPH and "ropesp.cli.generate" in GRAPH


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down_the_layers(module):
    wrong = sorted(i for i in GRAPH[module] if layer(i) not in MAY_IMPORT[layer(module)])
    assert not wrong, f"{module} ({layer(module)}) imports {wrong}"


def test_nothing_imports_the_cli():
    users = sorted(m for m, deps in GRAPH.items() if not m.startswith("ropesp.cli") and any(
        d == "ropesp.cli" or d.startswith("ropesp.cli.") for d in deps))  # fmt: skip
    assert not users


def test_no_import_circles():
    """Tarjan's strongly connected components over every import, lazy ones included."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
                circles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    # a package's __init__ that re-exports its own submodules is not a circle of the architecture
    circles = [c for c in circles if not _package_reexport(c)]
    assert not circles, circles


def _package_reexport(component: list[str]) -> bool:
    packages = [m for m in component if any(o.startswith(m + ".") for o in component)]
    return len(packages) == 1 and all(o == packages[0] or o.startswith(packages[0] + ".") for o in component) and all(
        packages[0] not in GRAPH[o] for o in component if o != packages[0])  # fmt: skip
