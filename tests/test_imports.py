"""The import graph of src/diffloop: no cycles, layers respected, no private names borrowed.

Every ``import`` / ``from ... import`` statement counts, including those inside functions and under
``if TYPE_CHECKING``: a function-level import still couples the two modules, it only hides the cycle
until the function runs. Edges go to the module named (``from diffloop.rewards import registry`` is
an edge to diffloop.rewards.registry; ``from diffloop.rewards import score`` one to
diffloop.rewards).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# module (or package: it covers its submodules) -> layer. A module may import only modules of its
# own layer or lower ones (and never in a cycle). Longest prefix wins.
LAYERS: dict[str, int] = {
    # the package itself (exact name only): lazily re-exports the API (Trainer, ...) and core
    "diffloop": 5,
    "diffloop.core": 0,
    "diffloop.seeding": 0,
    "diffloop.metrics": 1,
    "diffloop.config": 1,
    "diffloop.algorithms": 1,
    "diffloop.errors": 1,
    "diffloop.guards": 1,
    "diffloop.resume": 2,  # a run's own config on resume
    "diffloop.policies": 2,
    "diffloop.rewards": 2,
    "diffloop.prompts": 2,
    "diffloop.checkpoint": 2,
    "diffloop.sharded_checkpoint": 2,  # a sharded run's checkpoint tensors (DCP), its export
    "diffloop.ema": 2,  # the EMA of the trainable weights
    "diffloop.export": 2,  # LoRA files, model card, kohya copy, hub upload (it uses the policies)
    "diffloop.run_dir": 2,
    "diffloop.run_lock": 2,  # one training process per run directory
    "diffloop.disk": 2,  # writes aside, renamed when complete; a full disk in one line
    "diffloop.tracking": 2,  # accelerate's experiment trackers (logging.report_to)
    "diffloop.distributed": 2,
    "diffloop.monitors": 2,
    "diffloop.images": 2,
    "diffloop.shapes": 2,  # the shapes world, model and reward
    "diffloop.testing": 2,  # tiny random-weight models for tests and bench
    "diffloop.testing.runs": 3,  # short training runs for tests (the trainer, in-process)
    "diffloop.summary": 2,  # the end-of-run verdict and before/after grid
    "diffloop.performance": 2,  # process-wide backend settings (threads, TF32)
    "diffloop.memory": 2,  # the memory plan: arithmetic from the architectures' configs
    "diffloop.optimization": 2,  # optimizer, LR schedule, loss scaler, EMA: one step, resume
    "diffloop.loops": 3,  # the inner loops the trainer and the tools share
    "diffloop.evaluation": 3,  # the held-out evaluation of the trainer and `diffloop eval`
    "diffloop.trainer": 3,
    "diffloop.preflight": 3,
    "diffloop.tools": 4,  # experiment tooling: bench, sweep, variance, evaluate, report, sampling
    "diffloop.shapes.pretrain": 4,
    "diffloop.cli": 5,
    "diffloop.__main__": 5,
}


def module_files() -> dict[str, Path]:
    """{dotted module name: file} for every .py under src/diffloop."""
    out = {}
    for path in sorted((SRC / "diffloop").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement of ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                target = _resolve_relative(
                    module, path.name == "__init__.py", node.level, node.module
                )
            out.append((target, [alias.name for alias in node.names], node.lineno))
    return [
        (t, names, line) for t, names, line in out if t == "diffloop" or t.startswith("diffloop.")
    ]


def edges() -> dict[str, set[str]]:
    """module -> the diffloop modules it imports (submodules named in a from-import count as
    such)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, names, _ in imports_of(module):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if len(subs) < len(names) or not names:
                graph[module].add(_known(target))
            graph[module].update(subs)
        graph[module].discard(module)
    return graph


def _known(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _owns(prefix: str, module: str) -> bool:
    # "diffloop" names the package's __init__ only: an unlisted submodule must not inherit layer 0.
    return module == prefix or (prefix != "diffloop" and module.startswith(prefix + "."))


def layer(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if _owns(prefix, module):
            return LAYERS[prefix]
    raise KeyError(module)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_function_level_imports() -> None:
    # variance imports the trainer inside functions only; the graph must still hold the edge.
    assert "diffloop.trainer" in edges()["diffloop.tools.variance"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_has_a_layer() -> None:
    missing = [m for m in MODULES if not any(_owns(p, m) for p in LAYERS)]
    assert not missing, f"add these modules to LAYERS in tests/test_imports.py: {missing}"


def test_no_import_cycles() -> None:
    cycles = find_cycles(edges())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_lower_layers_do_not_import_higher_ones() -> None:
    bad = [
        f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
        for m, targets in edges().items()
        for t in sorted(targets)
        if layer(t) > layer(m)
    ]
    assert not bad, "layering violations:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_from_other_modules(module: str) -> None:
    bad = [
        f"{module}:{line} imports {name} from {target}"
        for target, names, line in imports_of(module)
        for name in names
        if name.startswith("_") and not name.startswith("__") and f"{target}.{name}" not in MODULES
        and _known(target) != module
    ]  # fmt: skip
    assert not bad, (
        "private names used across modules (make them public or move them): " + ", ".join(bad)
    )
