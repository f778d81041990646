"""The model zoo: small MLPs on offline datasets, with exact targets and gradient sets.

Each *group* is one training run (dataset, hidden widths, activation, seed, optimiser
settings) snapshotted after several numbers of steps; every snapshot is one zoo model.
For each model the exact large-sample targets (`gmcurv.gradmetanet.targets`) are computed
on the dataset's training part (>= 1,024 examples, or all of a smaller dataset), and
`draws` random sets of ``b`` examples are kept as gradient factors with their plug-in
estimates — the head's training inputs.

Held out for evaluation: the whole ``digits`` dataset (split ``test-dataset``, every
architecture) and the architectures `HELD_OUT_ARCHS` (split ``test-arch``, on the training
datasets). ``val`` models are new seeds of training combinations (model selection).

On disk (``cache_dir``, never in git)::

    data/<dataset>.safetensors        inputs/targets (training part), test/<dataset>.safetensors
    groups/<gid>.safetensors          weights, targets, draws of every snapshot (+ JSON metadata)
    plan.json                         the plan the zoo was built from
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from gmcurv.errors import ConfigError, DataError, UnsupportedError
from gmcurv.gradmetanet.features import GradientSet, PlugIn, gradient_set, mlp_chain, plug_in
from gmcurv.gradmetanet.targets import compute_targets
from gmcurv.io.data import load_data
from gmcurv.io.fileio import atomic_write_text
from gmcurv.models.mlp import MLP, LinearSpec
from gmcurv.objective import Objective

ZOO_VERSION = 1
HELD_OUT_DATASET = "digits"
REAL_DATASETS = ("digits", "breast_cancer", "wine", "iris")
SYNTHETIC_DATASETS = (
    "moons",
    "spirals",
    "blobs8",
    "quantiles6",
    "class16",
    "class32",
    "class64",
    "moons20",
)
TRAIN_ARCHS: tuple[tuple[int, ...], ...] = (
    (8,),
    (16,),
    (32,),
    (64,),
    (16, 16),
    (32, 32),
    (64, 32),
    (32, 16),
    (16, 16, 16),
    (32, 16, 8),
)
HELD_OUT_ARCHS: tuple[tuple[int, ...], ...] = ((24,), (24, 24), (48, 24, 12), (16, 16, 16, 16))
# Procedural task families of the ``tasks`` zoo: ``<family>-<seed>`` names one task instance
# (input dimension, classes, input scale, label noise drawn from the seed).
TASK_FAMILIES = ("gmm", "teacher", "xor")
# Tasks no ``tasks`` head trains or calibrates on (split ``test-task``).
HELD_OUT_TASKS = ("spiral10", "hastie10")
ACTIVATIONS = ("relu", "tanh", "gelu")
SNAPSHOTS = (0, 25, 100, 400, 1200)
SPLITS = ("train", "val", "calib", "test-dataset", "test-arch", "test-task")
SET_SIZE = 128
TRUTH_EXAMPLES = 1024  # synthetic datasets: training part size
TEST_EXAMPLES = 512

ProgressFn = Callable[[int, int], None]


def default_cache_dir() -> Path:
    """``$GMCURV_ZOO_DIR`` or ``~/.cache/gmcurv/zoo``."""
    env = os.environ.get("GMCURV_ZOO_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gmcurv" / "zoo"


# ---------------------------------------------------------------------------------- datasets
def _sklearn():
    try:
        import sklearn.datasets as skd
    except ImportError:
        raise UnsupportedError(
            "building the model zoo needs scikit-learn (its bundled datasets and generators)",
            hint="pip install scikit-learn (or the gmcurv[zoo] extra)",
        ) from None
    return skd


def _spirals(n: int, rng: random.Random) -> tuple[list[list[float]], list[int]]:
    xs, ys = [], []
    for i in range(n):
        arm = i % 3
        r = rng.random()
        t = 3.0 * math.pi * r + 2.0 * math.pi * arm / 3.0
        xs.append([r * math.cos(t) + rng.gauss(0, 0.05), r * math.sin(t) + rng.gauss(0, 0.05)])
        ys.append(arm)
    return xs, ys


def _family_task(name: str, n: int) -> tuple[Tensor, Tensor, float]:
    """Inputs, labels and input scale of a procedural task ``<family>-<seed>``.

    - ``gmm``: Gaussian mixture, 2-10 classes of 1-3 anisotropic clusters in 2-48 dims;
    - ``teacher``: labels drawn from a random one-hidden-layer teacher's softmax at a random
      inverse temperature (label noise built in), 2-10 classes, 4-48 Gaussian inputs;
    - ``xor``: parity (2 classes) or sign pattern (4 classes) of 2-3 of 4-32 inputs.

    Every family then flips a random share (0-30 %) of labels to random classes; the inputs
    are standardised and multiplied by a scale ``10^U(-0.7, 0.7)`` (returned).
    """
    family, _, tail = name.partition("-")
    if family not in TASK_FAMILIES or not tail.isdigit():
        raise ConfigError(
            f"unknown zoo dataset {name!r}",
            hint=f"use one of {', '.join(REAL_DATASETS + SYNTHETIC_DATASETS + HELD_OUT_TASKS)} "
            f"or <family>-<seed> with family in {', '.join(TASK_FAMILIES)}",
        )
    rng = random.Random(int(tail) * 7919 + TASK_FAMILIES.index(family))
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    if family == "gmm":
        d, k, c = (
            rng.choice((2, 3, 4, 6, 8, 12, 16, 24, 32, 48)),
            rng.randint(2, 10),
            rng.randint(1, 3),
        )
        sep = rng.uniform(0.5, 3.0)
        centers = sep * torch.randn(k * c, d, generator=g, dtype=torch.float64)
        stds = torch.exp(torch.empty(k * c, d, dtype=torch.float64).uniform_(-1, 1, generator=g))
        comp = torch.randint(0, k * c, (n,), generator=g)
        X = centers[comp] + stds[comp] * torch.randn(n, d, generator=g, dtype=torch.float64)
        y = comp % k
    elif family == "teacher":
        d, k, h = (
            rng.choice((4, 8, 12, 16, 24, 32, 48)),
            rng.randint(2, 10),
            rng.choice((16, 32, 64)),
        )
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
        W1 = torch.randn(d, h, generator=g, dtype=torch.float64) / math.sqrt(d)
        W2 = torch.randn(h, k, generator=g, dtype=torch.float64) / math.sqrt(h)
        beta = 10 ** rng.uniform(0.0, 1.2)
        logits = beta * torch.tanh(2.0 * X @ W1) @ W2
        y = torch.multinomial(torch.softmax(logits, 1), 1, generator=g)[:, 0]
    else:  # xor
        d, r, k = rng.choice((4, 8, 16, 32)), rng.choice((2, 3)), rng.choice((2, 4))
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
        signs = (X[:, :r] > 0).long()
        parity = signs.sum(1) % 2
        y = parity if k == 2 else parity + 2 * signs[:, 0]
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        X = X @ Q
    flip = rng.choice((0.0, 0.0, 0.05, 0.15, 0.3))
    mask = torch.rand(n, generator=g, dtype=torch.float64) < flip
    y = torch.where(mask, torch.randint(0, int(y.max()) + 1, (n,), generator=g), y)
    return X, y, 10 ** rng.uniform(-0.7, 0.7)


def make_dataset(name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: standardised float32 inputs, int64 labels.

    Real datasets are split 75/25 (digits: the first 1,297 shuffled examples train, so
    that its training part holds >= 1,024); synthetic ones are drawn with fixed seeds.
    """
    skd = _sklearn()
    n = TRUTH_EXAMPLES + TEST_EXAMPLES
    seed = 1234
    scale = 1.0
    if name in REAL_DATASETS:
        loader = {
            "digits": skd.load_digits,
            "breast_cancer": skd.load_breast_cancer,
            "wine": skd.load_wine,
            "iris": skd.load_iris,
        }[name]
        X, y = loader(return_X_y=True)
    elif name == "moons":
        X, y = skd.make_moons(n, noise=0.25, random_state=seed)
    elif name == "spirals":
        X, y = _spirals(n, random.Random(seed))
    elif name == "blobs8":
        X, y = skd.make_blobs(n, n_features=8, centers=5, cluster_std=3.0, random_state=seed)
    elif name == "quantiles6":
        X, y = skd.make_gaussian_quantiles(
            n_samples=n, n_features=6, n_classes=3, random_state=seed
        )
    elif name in ("class16", "class32", "class64"):
        d = int(name[5:])
        k = {16: 4, 32: 6, 64: 10}[d]
        X, y = skd.make_classification(
            n,
            n_features=d,
            n_informative=d // 2 if d < 64 else 16,
            n_redundant=d // 8,
            n_classes=k,
            n_clusters_per_class=2,
            flip_y=0.05,
            class_sep=1.0,
            random_state=seed,
        )
    elif name == "moons20":
        X2, y = skd.make_moons(n, noise=0.2, random_state=seed)
        g = torch.Generator().manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
        noise = 0.3 * torch.randn(n, 18, generator=g, dtype=torch.float64)
        X = (torch.cat([torch.as_tensor(X2), noise], 1) @ Q).numpy()
    elif name == "spiral10":  # 3-arm spiral rotated into 10 dims with 8 noise dims
        X2, y = _spirals(n, random.Random(seed + 1))
        g = torch.Generator().manual_seed(seed + 1)
        Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
        noise = 0.3 * torch.randn(n, 8, generator=g, dtype=torch.float64)
        X = (torch.cat([torch.as_tensor(X2, dtype=torch.float64), noise], 1) @ Q).numpy()
    elif name == "hastie10":  # y = [Σ x_i^2 > 9.34] on 10 Gaussian inputs
        X, y = skd.make_hastie_10_2(n, random_state=seed)
        y = (y > 0).astype("int64")
    else:
        X, y, scale = _family_task(name, n)
    X = torch.as_tensor(X, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    X, y = X[perm], y[perm]
    n_train = (
        1297
        if name == "digits"
        else (int(0.75 * len(y)) if name in REAL_DATASETS else TRUTH_EXAMPLES)
    )
    X = scale * (X - X[:n_train].mean(0)) / X[:n_train].std(0).clamp_min(1e-3)
    X = X.float()
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def dataset_files(cache_dir: Path, name: str) -> tuple[Path, Path]:
    """Write (once) and return the training and test files of a dataset."""
    train = cache_dir / "data" / f"{name}.safetensors"
    test = cache_dir / "test" / f"{name}.safetensors"
    if not (train.exists() and test.exists()):
        xtr, ytr, xte, yte = make_dataset(name)
        for path, x, y in ((train, xtr, ytr), (test, xte, yte)):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"inputs": x.contiguous(), "targets": y.contiguous()}, str(tmp))
            tmp.replace(path)
    return train, test


# ------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class GroupSpec:
    """One training run of the zoo and its snapshots."""

    gid: str
    dataset: str
    widths: tuple[int, ...]
    activation: str
    seed: int
    lr: float
    batch_size: int
    weight_decay: float
    steps: tuple[int, ...]
    split: str
    draws: int
    expensive: bool  # compute OBS curvature and the top Hessian eigenvalue
    fused: bool = False  # fused Adam kernel (same update, faster; the ``tasks`` zoo)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GroupSpec:
        d = dict(d)
        d["widths"], d["steps"] = tuple(d["widths"]), tuple(d["steps"])
        return cls(**d)


ZOO_SIZES = ("tiny", "small", "default", "tasks")


def zoo_plan(size: str = "default", seed: int = 0) -> list[GroupSpec]:
    """The groups of a zoo (deterministic in `seed`).

    ``default``: every training dataset x training architecture x activation (one seed,
    ``train``; OBS curvature and the top Hessian eigenvalue on every other run, to fit the
    time budget), a second seed for 1 in 8 of those (``val``), ``digits`` x every
    architecture x activation (``test-dataset``) and the held-out architectures on every
    training dataset with one activation each (``test-arch``); 5 snapshots per run.
    ``small`` and ``tiny`` are subsets for quick runs and tests.

    ``tasks`` (head v1.1): task diversity instead of combinations. ``train``: every
    training dataset x training architecture with a random activation, and 40 instances of
    each procedural family (`TASK_FAMILIES`, random architecture and activation); ``val``:
    9 new instances (model selection); ``calib``: 24 new instances, half of them on the
    held-out architectures (the intervals are fitted here: unseen tasks and
    architectures); ``test-task``: the `HELD_OUT_TASKS` on every architecture (unseen
    tasks, never used for training, selection or calibration).
    """
    if size == "tasks":
        return _tasks_plan(seed)
    if size not in ZOO_SIZES:
        raise ConfigError(f"unknown zoo size {size!r}", hint=f"use one of {ZOO_SIZES}")
    rng = random.Random(seed)
    train_sets = [d for d in REAL_DATASETS + SYNTHETIC_DATASETS if d != HELD_OUT_DATASET]
    archs, held, acts, steps = TRAIN_ARCHS, HELD_OUT_ARCHS, ACTIVATIONS, SNAPSHOTS
    if size == "small":
        train_sets = ["breast_cancer", "moons", "class16", "class64"]
        archs = ((16,), (32, 16), (16, 16, 16))
        held = ((24,),)
    elif size == "tiny":
        train_sets, archs, held, acts, steps = ["iris"], ((6,), (5, 4)), ((7,),), ("tanh",), (0, 40)
    specs: list[GroupSpec] = []

    add = _spec_adder(specs, rng, steps)

    for d in train_sets:
        for w in archs:
            for a in acts:
                add(d, w, a, "train", 3, expensive=len(specs) % 2 == 0 or size == "tiny")
                if rng.random() < 0.125 or size == "tiny":
                    add(d, w, a, "val", 2)
    if size == "tiny":
        add("wine", (6,), "tanh", "test-dataset", 2)
    else:
        for w in archs + held:
            for a in acts:
                add(HELD_OUT_DATASET, w, a, "test-dataset", 4)
    for i, d in enumerate(train_sets):
        for j, w in enumerate(held):
            add(d, w, acts[(i + j) % len(acts)], "test-arch", 4)
    return specs


def _tasks_plan(seed: int) -> list[GroupSpec]:
    """The ``tasks`` zoo (see `zoo_plan`), ordered so that a partial build is balanced:
    held-out and calibration groups first, then training groups interleaved (these with
    Fisher and Hessian diagonals and traces only: no OBS curvature, no top eigenvalue, to
    fit the build budget)."""
    rng = random.Random(seed + 101)
    specs: list[GroupSpec] = []

    add = _spec_adder(specs, rng, SNAPSHOTS, fused=True)

    all_archs = TRAIN_ARCHS + HELD_OUT_ARCHS
    for t in HELD_OUT_TASKS:
        for i, w in enumerate(all_archs):
            add(t, w, ACTIVATIONS[i % 3], "test-task", 4)
    instance = iter(range(10_000))
    for i in range(24):
        fam = TASK_FAMILIES[i % 3]
        w = HELD_OUT_ARCHS[i % 4] if i % 2 else rng.choice(TRAIN_ARCHS)
        add(f"{fam}-{next(instance)}", w, rng.choice(ACTIVATIONS), "calib", 3)
    for i in range(9):
        fam = TASK_FAMILIES[i % 3]
        add(f"{fam}-{next(instance)}", rng.choice(TRAIN_ARCHS), rng.choice(ACTIVATIONS), "val", 2)
    fixed = [d for d in REAL_DATASETS + SYNTHETIC_DATASETS if d != HELD_OUT_DATASET]
    fixed_runs = [(d, w) for d in fixed for w in TRAIN_ARCHS]
    rng.shuffle(fixed_runs)
    family_runs = [f"{TASK_FAMILIES[i % 3]}-{next(instance)}" for i in range(120)]
    for k in range(max(len(fixed_runs), len(family_runs))):
        for d, w in ([fixed_runs[k]] if k < len(fixed_runs) else []) + (
            [(family_runs[k], rng.choice(TRAIN_ARCHS))] if k < len(family_runs) else []
        ):
            add(d, w, rng.choice(ACTIVATIONS), "train", 3, expensive=False)
    return specs


# ---------------------------------------------------------------------------- training runs
def _init(model: MLP, gen: torch.Generator) -> None:
    """PyTorch's default Linear init (``U(±1/sqrt(fan_in))``) from a local generator."""
    with torch.no_grad():
        for lin in model.linears:
            bound = 1.0 / math.sqrt(lin.in_features)
            lin.weight.uniform_(-bound, bound, generator=gen)
            if lin.bias is not None:
                lin.bias.uniform_(-bound, bound, generator=gen)


def build_mlp(n_in: int, widths: tuple[int, ...], n_out: int, activation: str) -> MLP:
    sizes = [n_in, *widths, n_out]
    specs = [LinearSpec(f"fc{i}", sizes[i], sizes[i + 1], True) for i in range(len(sizes) - 1)]
    return MLP(specs, activation)


def train_snapshots(
    spec: GroupSpec, x: Tensor, y: Tensor, n_classes: int
) -> list[dict[str, Tensor]]:
    """Train the group's MLP with Adam (mini-batches from a local generator); the state
    dict after each of ``spec.steps`` steps."""
    gen = torch.Generator().manual_seed(spec.seed)
    model = build_mlp(x.shape[1], spec.widths, n_classes, spec.activation)
    _init(model, gen)
    opt = torch.optim.Adam(
        model.parameters(),
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        **({"fused": True} if spec.fused else {}),
    )
    out = []
    step = 0
    for target in sorted(spec.steps):
        while step < target:
            idx = torch.randint(0, len(y), (min(spec.batch_size, len(y)),), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


# ------------------------------------------------------------------------------ zoo records
@dataclass
class Draw:
    """One gradient set of ``b`` examples of a zoo model, with its plug-in estimates."""

    index: Tensor
    gs: GradientSet
    plug: PlugIn


@dataclass
class ZooModel:
    """One snapshot: spec, weights, exact targets (float64) and its draws."""

    spec: GroupSpec
    step: int
    state: dict[str, Tensor]
    targets: dict[
        str, Tensor
    ]  # "<kind>.<param>" -> tensor (kind: fisher_diag, obs_curv, hessian_diag)
    scalars: dict[str, float | bool | None]
    draws: list[Draw] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.spec.gid}@{self.step}"


def _set_size(n: int) -> int:
    """``b``: 128, or a quarter of a small dataset (the truth then includes few set members)."""
    return SET_SIZE if n >= 4 * SET_SIZE else max(8, n // 4)


def build_group(spec: GroupSpec, cache_dir: Path) -> Path:
    """Train, compute targets and draws for every snapshot; write ``groups/<gid>.safetensors``."""
    torch.set_num_threads(1)
    train_path, _ = dataset_files(cache_dir, spec.dataset)
    data = load_data(train_path)
    raw = safe_open(str(train_path), "pt")
    x, y = raw.get_tensor("inputs"), raw.get_tensor("targets")
    n_classes = int(y.max()) + 1
    states = train_snapshots(spec, x, y, n_classes)
    tensors: dict[str, Tensor] = {}
    meta: list[dict] = []
    gen = torch.Generator().manual_seed(spec.seed + 1)
    b = _set_size(len(y))
    for k, (step, state) in enumerate(zip(sorted(spec.steps), states, strict=True)):
        model = build_mlp(x.shape[1], spec.widths, n_classes, spec.activation).double()
        model.load_state_dict({n: v.double() for n, v in state.items()})
        obj = Objective.build(model, "cross_entropy")
        tg, dg = compute_targets(
            obj, data, batch_size=2048, obs=spec.expensive, top=spec.expensive, seed=spec.seed
        )
        chain = mlp_chain(model)
        with torch.no_grad():
            logits = model(x.double())
            acc = float((logits.argmax(1) == y).double().mean())
        for name, v in state.items():
            tensors[f"s{k}.w.{name}"] = v.float().contiguous()
        for kind, table in (
            ("fisher_diag", tg.fisher_diag),
            ("hessian_diag", tg.hessian_diag),
            ("obs_curv", tg.obs_curv),
        ):
            for name, v in (table or {}).items():
                tensors[f"s{k}.t.{kind}.{name}"] = v.double().contiguous()
        draws_meta = []
        for r in range(spec.draws):
            idx = torch.randperm(dg.n, generator=gen)[:b].sort().values
            sub = dg.select(idx)
            gs = gradient_set(sub, chain, obj.params)
            pl = plug_in(sub, chain)
            pre = f"s{k}.d{r}."
            tensors[pre + "index"] = idx
            tensors[pre + "losses"] = gs.losses.float()
            for l in range(gs.depth):
                tensors[pre + f"x{l}"] = gs.x[l].float().contiguous()
                tensors[pre + f"delta{l}"] = gs.delta[l].float().contiguous()
                tensors[pre + f"pdiag_w{l}"] = pl.diag_w[l].contiguous()
                tensors[pre + f"pobs_w{l}"] = pl.obs_w[l].contiguous()
                if pl.diag_b[l] is not None:
                    tensors[pre + f"pdiag_b{l}"] = pl.diag_b[l].contiguous()
                    tensors[pre + f"pobs_b{l}"] = pl.obs_b[l].contiguous()
            draws_meta.append({"trace": pl.trace, "top": pl.top, "eps": pl.eps})
        meta.append(
            {
                "step": step,
                "n": tg.n,
                "b": b,
                "accuracy": acc,
                "fisher_trace": tg.fisher_trace,
                "hessian_trace": tg.hessian_trace,
                "hessian_top": tg.hessian_top,
                "hessian_top_residual": tg.hessian_top_residual,
                "hessian_top_converged": tg.hessian_top_converged,
                "hessian_top_matvecs": tg.hessian_top_matvecs,
                "eps": tg.eps,
                "draws": draws_meta,
            }
        )
    out = cache_dir / "groups" / f"{spec.gid}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    header = {
        "spec": json.dumps(spec.to_dict()),
        "snapshots": json.dumps(meta),
        "zoo": str(ZOO_VERSION),
    }
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(out)
    return out


def _build_one(args: tuple[dict, str]) -> str:
    spec, cache = args
    return str(build_group(GroupSpec.from_dict(spec), Path(cache)))


def build_zoo(
    cache_dir: Path,
    size: str = "default",
    seed: int = 0,
    workers: int = 1,
    progress: ProgressFn | None = None,
    splits: tuple[str, ...] = SPLITS,
) -> list[GroupSpec]:
    """Build (or finish building: done groups are skipped) the zoo under `cache_dir`.

    `progress(done, total)` is called after every group. Worker processes (``workers > 1``)
    each use one thread.
    """
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan = [s for s in zoo_plan(size, seed) if s.split in splits]
    plan_file = cache_dir / "plan.json"
    if plan_file.exists():
        old = json.loads(plan_file.read_text())
        if old.get("size") != size or old.get("seed") != seed:
            raise ConfigError(
                f"{cache_dir} holds a zoo of size {old.get('size')!r} (seed {old.get('seed')}), "
                f"not {size!r} (seed {seed})",
                hint="use another --cache-dir, or the same --size/--seed to resume",
            )
    atomic_write_text(
        plan_file,
        json.dumps(
            {"zoo": ZOO_VERSION, "size": size, "seed": seed, "groups": [s.to_dict() for s in plan]},
            indent=1,
        ),
    )
    for name in sorted({s.dataset for s in plan}):
        dataset_files(cache_dir, name)
    todo = [s for s in plan if not (cache_dir / "groups" / f"{s.gid}.safetensors").exists()]
    done = len(plan) - len(todo)
    if progress:
        progress(done, len(plan))
    if workers <= 1:
        for s in todo:
            build_group(s, cache_dir)
            done += 1
            if progress:
                progress(done, len(plan))
        return plan
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_build_one, (s.to_dict(), str(cache_dir))) for s in todo]
        for f in cf.as_completed(futures):
            f.result()
            done += 1
            if progress:
                progress(done, len(plan))
    return plan


# ---------------------------------------------------------------------------------- loading
def read_plan(cache_dir: Path) -> dict:
    path = Path(cache_dir).expanduser() / "plan.json"
    if not path.exists():
        raise DataError(
            f"{cache_dir}: no model zoo here (plan.json missing)",
            hint="build one with: gmcurv head zoo --cache-dir DIR",
        )
    return json.loads(path.read_text())


def _opt(t: dict[str, Tensor], key: str) -> Tensor | None:
    return t.get(key)


def read_group(path: Path) -> list[ZooModel]:
    """All snapshots of one group file."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    spec = GroupSpec.from_dict(json.loads(meta["spec"]))
    snaps = json.loads(meta["snapshots"])
    models = []
    for k, sm in enumerate(snaps):
        state = {
            key[len(f"s{k}.w.") :]: v for key, v in tensors.items() if key.startswith(f"s{k}.w.")
        }
        targets = {
            key[len(f"s{k}.t.") :]: v for key, v in tensors.items() if key.startswith(f"s{k}.t.")
        }
        depth = len(spec.widths) + 1
        draws = []
        for r, dm in enumerate(sm["draws"]):
            pre = f"s{k}.d{r}."
            gs = GradientSet(
                tuple(tensors[pre + f"x{l}"].double() for l in range(depth)),
                tuple(tensors[pre + f"delta{l}"].double() for l in range(depth)),
                tuple(state[f"fc{l}.weight"].double() for l in range(depth)),
                tuple(state[f"fc{l}.bias"].double() for l in range(depth)),
                tensors[pre + "losses"].double(),
                spec.activation,
            )
            pl = PlugIn(
                tuple(tensors[pre + f"pdiag_w{l}"] for l in range(depth)),
                tuple(_opt(tensors, pre + f"pdiag_b{l}") for l in range(depth)),
                tuple(tensors[pre + f"pobs_w{l}"] for l in range(depth)),
                tuple(_opt(tensors, pre + f"pobs_b{l}") for l in range(depth)),
                dm["trace"],
                dm["top"],
                dm["eps"],
            )
            draws.append(Draw(tensors[pre + "index"], gs, pl))
        scalars = {k2: v for k2, v in sm.items() if k2 != "draws"}
        models.append(ZooModel(spec, sm["step"], state, targets, scalars, draws))
    return models


def iter_zoo(cache_dir: Path, splits: tuple[str, ...]) -> Iterator[ZooModel]:
    """The built models of the chosen splits, in plan order."""
    plan = read_plan(cache_dir)
    for d in plan["groups"]:
        if d["split"] not in splits:
            continue
        path = Path(cache_dir).expanduser() / "groups" / f"{d['gid']}.safetensors"
        if path.exists():
            yield from read_group(path)


def zoo_model(zm: ZooModel, n_in: int, n_classes: int) -> MLP:
    """The zoo model as a float64 `MLP`."""
    model = build_mlp(n_in, zm.spec.widths, n_classes, zm.spec.activation).double()
    model.load_state_dict({k: v.double() for k, v in zm.state.items()})
    return model


def _spec_adder(specs: list[GroupSpec], rng: random.Random, steps, **fixed):
    """A function appending one group to `specs`: hyper-parameters drawn from `rng` in a fixed
    order (seed, lr, batch size, weight decay), so a plan's ids and seeds never change."""

    def add(dataset, widths, act, split, draws, expensive=True):
        specs.append(
            GroupSpec(
                gid=f"{split}-{dataset}-{'x'.join(map(str, widths))}-{act}-{len(specs):04d}",
                dataset=dataset,
                widths=tuple(widths),
                activation=act,
                seed=rng.randrange(2**31),
                lr=10 ** rng.uniform(-2.5, -1.5),
                batch_size=rng.choice((32, 64, 128)),
                weight_decay=rng.choice((0.0, 0.0, 1e-4)),
                steps=steps,
                split=split,
                draws=draws,
                expensive=expensive,
                **fixed,
            )
        )

    return add
