"""Training data and training loop of head v2 on the transformer zoo (`tzoo`).

An *item* is one draw of ``b`` sequences of one snapshot of one zoo group: the model is
rebuilt from the stored weights (transformers groups through ``save_pretrained`` /
`load_model`, as the zoo did), the set's gradients are captured again (`tfeatures.extract`:
the full per-sequence Gram, which the stored Linear factors alone do not give) and turned
into a `HeadV2Input`; its targets are the zoo's large-sample values.

Loss (per item, averaged): for the trace, a Huber loss on
``(pred - tr H) / (|tr H| + 0.1 tr F_S)`` (relative, bounded where ``tr H`` is near zero);
for ``λ_max`` the squared log ratio. Inputs are cached per item under ``<zoo>/inputs``.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gmcurv.batch import Batch
from gmcurv.data import DataSample
from gmcurv.gradmetanet import tzoo
from gmcurv.gradmetanet.tfeatures import extract
from gmcurv.gradmetanet.tlayers import HeadV2, HeadV2Config, HeadV2Input
from gmcurv.gradmetanet.ttop import TopCorrection, scale_free_features
from gmcurv.io.data import load_data
from gmcurv.io.samples import SAMPLE_ROOT
from gmcurv.objective import Objective


@dataclass
class Item:
    gid: str
    split: str
    family: str
    task: str
    step: int
    draw: int
    n_params: int
    inp: HeadV2Input
    trace: float  # large-sample tr H (Hutch++)
    trace_se: float
    top: float  # large-sample λ_max(H) (Lanczos)


def group_files(cache_dir: Path) -> list[Path]:
    return sorted((Path(cache_dir) / "groups").glob("*.safetensors"))


def read_group(path: Path) -> tuple[tzoo.LMGroupSpec, list[dict], dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return tzoo.LMGroupSpec.from_dict(json.loads(md["spec"])), json.loads(md["snapshots"]), tensors


def truth_ids(spec: tzoo.LMGroupSpec, n: int) -> torch.Tensor:
    """The zoo's `n` truth sequences of the group's task (regenerated as the zoo drew them)."""
    return tzoo.task_ids(spec.task, n)[0][:n]


def snapshot_objective(
    spec: tzoo.LMGroupSpec, tensors: dict[str, torch.Tensor], k: int, vocab: int, tmp: Path
) -> Objective:
    """The float64 objective of snapshot `k` (as the zoo built it)."""
    prefix = f"s{k}.w."
    state = {n[len(prefix) :]: v for n, v in tensors.items() if n.startswith(prefix)}
    if spec.family != "tiny":
        model = tzoo.hf_model(spec, vocab)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any("lm_head" not in m for m in missing):
            raise ValueError(f"{spec.gid}: stored weights do not fit ({missing}, {unexpected})")
        state = dict(model.state_dict().items())
    obj, _ = tzoo._snapshot_objective(spec, state, vocab, tmp, k)
    return obj


def snapshot_batches(spec, tensors, k: int, draws: int, n: int) -> list[Batch]:
    ids = truth_ids(spec, n)
    out = []
    for r in range(draws):
        idx = tensors[f"s{k}.d{r}.index"]
        sub = ids[idx]
        out.append(Batch(sub, None, 0))
    return out


def _load_items(cfile: Path) -> list[Item] | None:
    """Cached items, unpickled with only tensors, `Item` and `HeadV2Input` allowed (no code
    runs); None on torch < 2.5, which lacks `safe_globals` (the caller re-extracts)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:
        return None
    with safe_globals([Item, HeadV2Input]):
        return torch.load(cfile, weights_only=True)


@dataclass
class ZooSet:
    """One draw of ``b`` sequences of one snapshot of a zoo group, with its objective."""

    spec: tzoo.LMGroupSpec
    meta: dict  # the snapshot's metadata: step, vocab, n, targets (`tzoo.build_group`)
    k: int  # snapshot index
    draw: int
    objective: Objective
    batch: Batch
    tmp: Path  # a scratch directory that lives while the group's sets are iterated

    def data(self) -> DataSample:
        """The set as a data file loaded the way the CLI loads one (for `equal_cost`,
        `CurvatureOperator`)."""
        f = self.tmp / f"set{self.k}_{self.draw}.safetensors"
        key = "inputs" if self.spec.family == "tiny" else "input_ids"
        save_file({key: self.batch.inputs.contiguous()}, str(f))
        return load_data(f)


def read_spec(path: Path) -> tzoo.LMGroupSpec:
    """A zoo group's spec from its header (no tensors read)."""
    with safe_open(str(path), "pt") as f:
        return tzoo.LMGroupSpec.from_dict(json.loads(f.metadata()["spec"]))


def group_sets(path: Path, draws: int | None = None) -> Iterator[ZooSet]:
    """Every draw (the first ``draws`` if given) of every snapshot of one zoo group, rebuilt
    as the zoo built it (float64 objective)."""
    spec, meta, tensors = read_group(path)
    with tempfile.TemporaryDirectory() as tmp:
        for k, m in enumerate(meta):
            obj = snapshot_objective(spec, tensors, k, m["vocab"], Path(tmp))
            n_draws = spec.draws if draws is None else draws
            for r, batch in enumerate(snapshot_batches(spec, tensors, k, n_draws, m["n"])):
                yield ZooSet(spec, m, k, r, obj, batch, Path(tmp))


def zoo_sets(
    cache_dir: Path,
    keep: Callable[[tzoo.LMGroupSpec], bool] | None = None,
    draws: int | None = None,
) -> Iterator[ZooSet]:
    """`group_sets` of every finished group whose spec ``keep`` accepts (e.g. `held_out`).
    A set's objective and `ZooSet.data` live only until the walk moves to the next group."""
    for path in group_files(cache_dir):
        if keep is None or keep(read_spec(path)):
            yield from group_sets(path, draws)


def held_out(spec: tzoo.LMGroupSpec) -> bool:
    """The held-out splits (``test-task``, ``test-arch``, ``test-hf``)."""
    return spec.split.startswith("test")


def group_items(path: Path, cache: Path) -> list[Item]:
    """The items of one zoo group, from ``cache/<gid>.pt`` or extracted (and cached)."""
    spec = read_spec(path)
    cfile = cache / f"{spec.gid}.pt"
    if cfile.exists() and (cached := _load_items(cfile)) is not None:
        return cached
    torch.set_num_threads(1)
    group_items = []
    for zs in group_sets(path):
        inp = HeadV2Input.from_tset(extract(zs.objective, zs.batch))
        m = zs.meta
        tr = m["hessian_trace"]
        group_items.append(
            Item(
                spec.gid, spec.split, spec.family, spec.task, m["step"], zs.draw,
                m["n_params"], inp, tr["value"], tr["stderr"] or 0.0, m["hessian_top"],
            )
        )  # fmt: skip
    tmp_file = cfile.with_suffix(".tmp")
    torch.save(group_items, tmp_file)
    tmp_file.replace(cfile)
    return group_items


def load_items(cache_dir: Path, splits: tuple[str, ...] | None = None) -> list[Item]:
    """Every draw of every finished group (inputs cached under ``<cache_dir>/inputs``)."""
    cache = Path(cache_dir) / "inputs"
    cache.mkdir(parents=True, exist_ok=True)
    items: list[Item] = []
    for path in group_files(cache_dir):
        got = group_items(path, cache)
        items += [it for it in got if splits is None or it.split in splits]
    return items


@dataclass(frozen=True)
class TrainV2Config:
    epochs: int = 60
    lr: float = 3e-3
    weight_decay: float = 1e-2
    seed: int = 0
    huber: float = 0.5
    truth_se: float = 2.0  # trace loss scale adds this many of the truth's standard errors


def trace_scale(it: Item, k_se: float) -> float:
    """The trace loss's scale ``|tr H| + k_se se(tr H) + 0.1 tr Ĝ``: relative where the
    truth is large and well measured, down-weighted where Hutch++ could not pin it (near
    init its standard error is as large as the value: no target to learn there)."""
    return abs(it.trace) + k_se * it.trace_se + 0.1 * it.inp.plug_trace


def item_loss(model: HeadV2, it: Item, huber: float, k_se: float = 2.0) -> torch.Tensor:
    out = model(it.inp)
    pred_tr = out.trace(it.inp)
    l_tr = torch.nn.functional.huber_loss(
        (pred_tr - it.trace) / trace_scale(it, k_se),
        torch.zeros((), dtype=pred_tr.dtype),
        delta=huber,
    )
    l_top = (math.log(it.inp.seq_top) + out.r_top - math.log(it.top)) ** 2
    return l_tr + l_top


def train_v2(
    items: list[Item], config: TrainV2Config | None = None, head: HeadV2Config | None = None
) -> HeadV2:
    """Adam over items (one at a time), cosine learning rate; globals standardised."""
    cfg = config or TrainV2Config()
    torch.set_num_threads(1)  # tiny ops: threads only contend on a shared machine
    model = HeadV2(head, seed=cfg.seed)
    G = torch.stack([it.inp.globals for it in items]).float()
    model.g_mean.copy_(G.mean(0))
    model.g_std.copy_(G.std(0).clamp_min(0.25))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(items)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    rng = random.Random(cfg.seed)
    usable = [it for it in items if it.top > 0 and it.inp.seq_top > 0]
    for _ in range(cfg.epochs):
        order = usable[:]
        rng.shuffle(order)
        for it in order:
            loss = item_loss(model, it, cfg.huber, cfg.truth_se)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    return model.eval()


class HeadV2Ensemble(torch.nn.Module):
    """Heads trained from different seeds; the prediction averages their outputs ``r`` and
    shrinks them towards the plug-in by factors ``α`` fitted out of fold (`fit_shrink`):
    ``tr H = tr Ĝ (1 + α_tr mean r_tr)``, ``λ = T_eff λ_F exp(α_top mean r_top)``."""

    def __init__(self, heads: list[HeadV2], shrink: tuple[float, float] = (1.0, 1.0)):
        super().__init__()
        self.heads = torch.nn.ModuleList(heads)
        self.register_buffer("shrink", torch.tensor(shrink, dtype=torch.float64))

    def forward(self, inp: HeadV2Input):
        outs = [h(inp) for h in self.heads]
        first = outs[0]
        a_tr, a_top = (self.shrink[0].to(first.r_trace.dtype), self.shrink[1])
        first.r_trace = a_tr * torch.stack([o.r_trace for o in outs]).mean()
        first.r_top = a_top.to(first.r_top.dtype) * torch.stack([o.r_top for o in outs]).mean()
        return first


SHRINK_GRID = tuple(k / 10 for k in range(11))


@torch.no_grad()
def fit_shrink(pairs: list[tuple[torch.nn.Module, list[Item]]]) -> tuple[float, float]:
    """``(α_tr, α_top)`` on the grid `SHRINK_GRID` minimising the out-of-fold mean error
    (relative for the trace, on items whose truth is pinned: s.e. <= 10 %; ``|log|`` for
    λ_max) of ``(model, items it never saw)`` pairs. α = 0 is the plug-in itself: a head
    whose correction does not carry over to unseen tasks is switched off, not trusted."""
    r_tr, r_top = [], []
    for model, items in pairs:
        for it in items:
            out = model(it.inp)
            r_tr.append((float(out.r_trace), it))
            r_top.append((float(out.r_top), it))

    def err_tr(a: float) -> float:
        e = [
            abs(it.inp.plug_trace * (1 + a * r) - it.trace) / abs(it.trace)
            for r, it in r_tr
            if it.trace_se <= 0.1 * abs(it.trace)
        ]
        return sum(e) / max(len(e), 1)

    def err_top(a: float) -> float:
        e = [abs(math.log(it.inp.seq_top / it.top) + a * r) for r, it in r_top]
        return sum(e) / max(len(e), 1)

    return min(SHRINK_GRID, key=err_tr), min(SHRINK_GRID, key=err_top)


def train_ensemble(
    items: list[Item],
    config: TrainV2Config | None = None,
    head: HeadV2Config | None = None,
    members: int = 3,
) -> HeadV2Ensemble:
    """`members` heads trained by `train_v2` with seeds ``seed, seed + 1, ...``."""
    cfg = config or TrainV2Config()
    heads = [
        train_v2(items, TrainV2Config(**{**cfg.__dict__, "seed": cfg.seed + k}), head)
        for k in range(members)
    ]
    return HeadV2Ensemble(heads).eval()


@torch.no_grad()
def predict(model: HeadV2 | HeadV2Ensemble, inp: HeadV2Input) -> tuple[float, float]:
    """``(tr H, λ_max(H))`` predicted by the head (or an ensemble of heads)."""
    out = model(inp)
    return float(out.trace(inp)), float(out.top(inp))


def item_top_features(it: Item) -> list[float]:
    """``φ`` of `ttop` for a cached item (the same numbers `ttop.tset_features` gives)."""
    inp = it.inp
    shares = [
        (int(r), float(f[0])) for r, f in zip(inp.roles.tolist(), inp.layer_feats, strict=True)
    ]
    return scale_free_features(inp.globals, shares, inp.seq_trace, inp.plug_trace)


TOP_FILE = SAMPLE_ROOT / "gradmetanet_head_v2_top.json"


def load_top_correction(path: Path | None = None) -> tuple[TopCorrection, dict]:
    """The shipped λ_max correction (JSON: numbers only, nothing executes) and its
    held-out summary (``bench/gradmetanet/bench_head_v2_top.py`` wrote both)."""
    d = json.loads(Path(path or TOP_FILE).read_text(encoding="utf-8"))
    return TopCorrection.from_dict(d), d.get("heldout", {})
