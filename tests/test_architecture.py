"""The layer map of the package, enforced on its own source.

Data flows one way: files are read by ``io``, the model's per-example gradients are taken
by ``capture``, curvature is computed by the ``estimators``, numbers become a report in
``results`` and are shown by the ``cli``. Imports follow the same order (a module imports
its own layer and the layers below it) with one more rule: the engine (``capture``,
``estimators``) never imports ``io`` — the CLI (or a workflow) reads with ``io`` and hands
the engine modules, tensors and `DataSample` objects.

Every module of ``gmcurv`` (and of the top-level ``cli/``, installed as ``gmcurv.cli``) is
parsed with `ast`, imports inside functions and ``TYPE_CHECKING`` blocks included, and the
test fails on (a) an import circle, (b) an import into a layer that may not see the target,
(c) a private name (``_x``) imported from another module, (d) a module no layer claims.

Where a new module goes: a new estimator -> ``estimators`` (it takes an `Objective` and a
`DataSample`, never a path); a new file format or model source -> ``io``; a new model
family -> ``model`` (``gmcurv/models/``); a new command -> ``cli``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Layer:
    name: str
    doc: str
    modules: tuple[str, ...]  # module names or package prefixes (``gmcurv.io`` = the package)
    may_import: tuple[str, ...]  # layers below this one it may use (its own layer always)


LAYERS = (
    Layer(
        "base",
        "vocabulary every layer may use: errors, the version, seeded noise, parameter "
        "spaces, `Estimate`, memory budgets, torchrun communication, SDPA routing",
        (
            "gmcurv",
            "gmcurv.errors",
            "gmcurv.rng",
            "gmcurv.params",
            "gmcurv.estimate",
            "gmcurv.memory",
            "gmcurv.distributed",
            "gmcurv.attention",
        ),
        (),
    ),
    Layer(
        "model",
        "what is analysed, in memory: model families, losses (the maths), train/eval "
        "modes, batches and lazy data samples, LoRA adapters as tensors",
        (
            "gmcurv.models",
            "gmcurv.losses",
            "gmcurv.modes",
            "gmcurv.piecewise",
            "gmcurv.batch",
            "gmcurv.data",
            "gmcurv.datacheck",
            "gmcurv.lora",  # the package itself imports nothing
            "gmcurv.lora.adapter",
            "gmcurv.gradmetanet",  # the package itself imports nothing
        ),
        ("base",),
    ),
    Layer(
        "io",
        "everything that touches files: checkpoints, safetensors headers, masks sidecars, "
        "metadata, data shards, architecture resolution and --arch/--loss factories, atomic "
        "writes, exports, pruned checkpoints, adapter files, the bundled samples",
        ("gmcurv.io", "gmcurv.sample_models"),
        ("base", "model"),
    ),
    Layer(
        "capture",
        "the objective (model + loss + parameters) and decomposed per-example gradients",
        ("gmcurv.objective", "gmcurv.capture", "gmcurv.factors"),
        ("base", "model"),
    ),
    Layer(
        "estimators",
        "curvature from captured gradients and matrix-vector products: Fisher/GGN/Hessian "
        "traces, eigenvalues, spectra, diagonals, damped inverses, landscapes, saliency and "
        "pruning, LoRA features and curvature, the GradMetaNet head's features and "
        "predictions",
        (
            "gmcurv.products",
            "gmcurv.batchpass",
            "gmcurv.graphcache",
            "gmcurv.batchstate",
            "gmcurv.operator",
            "gmcurv.fisher",
            "gmcurv.ggn",
            "gmcurv.hessian",
            "gmcurv.lanczos",
            "gmcurv.block_krylov",
            "gmcurv.gram_sum",
            "gmcurv.lanczos_trace",
            "gmcurv.stochastic",
            "gmcurv.density",
            "gmcurv.diagonal",
            "gmcurv.woodbury",
            "gmcurv.landscape",
            "gmcurv.saliency",  # the package: SALIENCY_ROOMS, each importing only earlier ones
            "gmcurv.pruning",
            "gmcurv.lora.features",
            "gmcurv.lora.mapping",
            "gmcurv.lora.curvature",
            "gmcurv.gradmetanet.features",
            "gmcurv.gradmetanet.modelfisher",
            "gmcurv.gradmetanet.blend",
            "gmcurv.gradmetanet.layers",
            "gmcurv.gradmetanet.model",
            "gmcurv.gradmetanet.calibration",
            "gmcurv.gradmetanet.head",
            "gmcurv.gradmetanet.baselines",
            "gmcurv.gradmetanet.targets",
            "gmcurv.gradmetanet.predict",
            "gmcurv.gradmetanet.tfeatures",
            "gmcurv.gradmetanet.tlayers",
            "gmcurv.gradmetanet.tbaselines",
            "gmcurv.gradmetanet.ttop",
        ),
        ("base", "model", "capture"),
    ),
    Layer(
        "workflows",
        "offline pipelines that run estimators and keep files (like the CLI, but without "
        "printing): the GradMetaNet head's model zoos, training, evaluation, model card and "
        "the shipped head file",
        (
            "gmcurv.gradmetanet.pretrained",
            "gmcurv.gradmetanet.zoo",
            "gmcurv.gradmetanet.provenance",
            "gmcurv.gradmetanet.tzoo",
            "gmcurv.gradmetanet.tlm",
            "gmcurv.gradmetanet.ttrain",
            "gmcurv.gradmetanet.train",
            "gmcurv.gradmetanet.evaluate",
            "gmcurv.gradmetanet.card",
        ),
        ("base", "model", "io", "capture", "estimators"),
    ),
    Layer(
        "results",
        "the JSON report, its schema and --fail-if rules (data only: no engine, no files)",
        ("gmcurv.results", "gmcurv.rules"),
        ("base",),
    ),
    Layer(
        "cli",
        "the Typer front end: parses options, calls io and the engine, renders results",
        ("gmcurv.cli", "gmcurv.__main__"),
        ("base", "model", "io", "capture", "estimators", "workflows", "results"),
    ),
)

# The saliency package's modules, in the order they may import each other (a module only
# imports those before it; the package's __init__ re-exports them all).
SALIENCY_ROOMS = (
    "curvature",
    "criteria",
    "selection",
    "compensation",
    "sweep",
    "analysis",
    "rounds",
)

# Imports that break the map, each with a comment saying who removes it and when. Empty:
# the last one (landscape loading its --to checkpoints) went when gmcurv.io.endpoints came.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def source_files() -> dict[str, Path]:
    """``{module name: file}`` for the package; the top-level ``cli/`` and ``sample_models/``
    install as ``gmcurv.cli`` and ``gmcurv.sample_models`` (pyproject.toml's package-dir)."""
    roots = [(ROOT / "gmcurv", "gmcurv")]
    for top in ("cli", "sample_models"):
        if (ROOT / top / "__init__.py").is_file():
            roots.append((ROOT / top, f"gmcurv.{top}"))
    files = {}
    for base, prefix in roots:
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([prefix, *parts])] = path
    return files


FILES = source_files()
MODULES = set(FILES)


def is_package(module: str) -> bool:
    return FILES[module].name == "__init__.py"


def owner(name: str) -> str:
    """The module that defines `name` (a module, or an attribute of the closest module)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


@dataclass(frozen=True)
class Import:
    source: str
    target: str  # the module imported from
    name: str | None  # the name imported from it (None: the module itself)
    line: int


def imports_of(module: str) -> list[Import]:
    """Every ``gmcurv`` import in the module, at any depth (functions, TYPE_CHECKING)."""
    tree = ast.parse(FILES[module].read_text(), str(FILES[module]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.partition(".")[0] == "gmcurv":
                    found.append(Import(module, owner(alias.name), None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package(module) else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.partition(".")[0] != "gmcurv":
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                if full in MODULES:  # `from gmcurv import distributed`: a submodule
                    found.append(Import(module, full, None, node.lineno))
                else:
                    found.append(Import(module, owner(target), alias.name, node.lineno))
    return found


IMPORTS = {m: imports_of(m) for m in sorted(MODULES)}


def layer_of(module: str) -> Layer | None:
    """The layer claiming the longest prefix of `module`."""
    best, length = None, -1
    for layer in LAYERS:
        for prefix in layer.modules:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = layer, len(prefix)
    return best


def graph() -> dict[str, set[str]]:
    """Module -> modules it imports, plus the packages Python initialises on the way
    (importing ``a.b.c`` runs ``a/b/__init__.py``), except the importer's own packages."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, found in IMPORTS.items():
        for imp in found:
            target = imp.target
            while target:
                if target != module and not module.startswith(target + "."):
                    edges[module].add(target)
                target = target.rpartition(".")[0]
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_parser_sees_the_package():
    assert {"gmcurv", "gmcurv.capture", "gmcurv.io.checkpoint", "gmcurv.cli.app"} <= MODULES
    assert len(MODULES) > 80
    deferred = [i for i in IMPORTS["gmcurv.cli.session"] if i.target == "gmcurv.io.checkpoint"]
    assert deferred, "imports inside functions are part of the graph"


def test_every_module_has_a_layer():
    assert [m for m in sorted(MODULES) if layer_of(m) is None] == []


def test_layers_are_ordered_and_may_only_import_layers_below():
    names = [layer.name for layer in LAYERS]
    for i, layer in enumerate(LAYERS):
        assert set(layer.may_import) <= set(names[:i]), layer.name


def test_no_import_circle():
    assert cycles(graph()) == []


def test_imports_follow_the_layer_map():
    bad, used = [], set()
    for module, found in IMPORTS.items():
        src = layer_of(module)
        assert src is not None
        for imp in found:
            dst = layer_of(imp.target)
            assert dst is not None
            if dst.name == src.name or dst.name in src.may_import:
                continue
            if (module, imp.target) in KNOWN_VIOLATIONS:
                used.add((module, imp.target))
                continue
            bad.append(f"{module}:{imp.line} ({src.name}) imports {imp.target} ({dst.name})")
    assert bad == []
    assert used == KNOWN_VIOLATIONS, "a fixed violation must leave KNOWN_VIOLATIONS"


def test_no_private_name_crosses_a_module():
    bad = [
        f"{imp.source}:{imp.line} imports {imp.name} from {imp.target}"
        for found in IMPORTS.values()
        for imp in found
        if imp.name
        and imp.name.startswith("_")
        and not (imp.name.startswith("__") and imp.name.endswith("__"))
        and imp.target != imp.source
    ]
    assert bad == []


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.name)
def test_every_layer_is_documented_and_non_empty(layer):
    assert layer.doc
    assert any(layer_of(m) is layer for m in MODULES), layer.name


def test_saliency_rooms_import_one_way():
    package = "gmcurv.saliency"
    rooms = {f"{package}.{name}": i for i, name in enumerate(SALIENCY_ROOMS)}
    assert {m for m in MODULES if m.startswith(package + ".")} == set(rooms)
    bad = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        for module, i in rooms.items()
        for imp in IMPORTS[module]
        if imp.target.startswith(package) and rooms.get(imp.target, len(rooms)) >= i
    ]
    assert bad == []
