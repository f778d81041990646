"""Training the head on the zoo: seeded, resumable, with progress callbacks.

Each step sees the stacked draws (gradient sets) of a few zoo models. The loss, per draw:

- per-parameter channel ``k`` (Fisher diagonal, OBS curvature): the normalised mean
  absolute error over the whole model, ``Σ |pred - true| / Σ |true|`` (parameters in
  their own units, so layers count by their real size — the paper's metric), plus
  `log_weight` times the mean absolute log-ratio ``|log(pred) - log(true + floor)|``
  (scale-free, keeps small entries — and rankings — honest);
- scalars (Fisher trace, Hessian trace, top Hessian eigenvalue): ``|log pred - log true|``,
  masked where a target is missing or not positive.

Everything is trained in normalised units (`gmcurv.gradmetanet.features.encode`), so models of
very different scales train together. Checkpoints (safetensors + JSON, no pickle) are written
every `checkpoint_every` steps and at each epoch's end; `train_head` resumes from one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from gmcurv.errors import ConfigError
from gmcurv.gradmetanet.features import HeadInput, encode, stack_inputs
from gmcurv.gradmetanet.model import (
    PARAM_TARGETS,
    SCALAR_TARGETS,
    GradMetaNet,
    HeadConfig,
    HeadOutput,
    log_prediction,
)
from gmcurv.gradmetanet.zoo import ZooModel, iter_zoo

TARGET_FLOOR = 1e-3  # floor inside log(true), relative to the layer's mean true value


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (defaults: those of the shipped head)."""

    epochs: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    models_per_step: int = 4
    warmup_steps: int = 100
    clip: float = 1.0
    log_weight: float = 0.25
    obs_weight: float = 0.5
    scalar_weight: float = 0.3
    seed: int = 0
    checkpoint_every: int = 200

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------- items
@dataclass
class Item:
    """One zoo model's draws, encoded and stacked, with normalised truth.

    ``t_w[l]: [R, O, I, K]``, ``t_b[l]: [R, O, K]`` (NaN where a channel is missing),
    ``t_s: [S]`` in the model's units (NaN where missing).
    """

    name: str
    inp: HeadInput
    t_w: tuple[Tensor, ...]
    t_b: tuple[Tensor | None, ...]
    t_s: Tensor


def _truth(zm: ZooModel, kind: str, name: str | None, like: Tensor | None) -> Tensor | None:
    if name is None:
        return None
    t = zm.targets.get(f"{kind}.{name}")
    if t is None:
        assert like is not None
        return torch.full_like(like, math.nan)
    return t.double()


def make_item(zm: ZooModel, dtype: torch.dtype = torch.float32) -> Item:
    """Encode a zoo model's draws and normalise its targets by each draw's units."""
    inputs = [encode(d.gs, d.plug, dtype) for d in zm.draws]
    inp = stack_inputs(inputs)
    depth = inp.depth
    t_w, t_b = [], []
    for l in range(depth):
        w, b = f"fc{l}.weight", f"fc{l}.bias"
        fd_w = _truth(zm, "fisher_diag", w, None)
        fd_b = _truth(zm, "fisher_diag", b if inp.plug_b[l] is not None else None, None)
        ob_w = _truth(zm, "obs_curv", w, fd_w)
        ob_b = _truth(zm, "obs_curv", b if fd_b is not None else None, fd_b)
        uw = inp.unit_w[l].double()[:, None, None]
        tw = torch.stack([fd_w, ob_w], -1)[None] / uw[..., None]
        t_w.append(tw.to(dtype))
        if fd_b is None or ob_b is None:
            t_b.append(None)
        else:
            ub = inp.unit_b[l].double()[:, None]
            t_b.append((torch.stack([fd_b, ob_b], -1)[None] / ub[..., None]).to(dtype))
    sc = zm.scalars

    def val(key: str) -> float:
        v = sc.get(key)
        return math.nan if v is None else float(v)

    t_s = torch.tensor([val("fisher_trace"), val("hessian_trace"), val("hessian_top")])
    return Item(zm.name, inp, tuple(t_w), tuple(t_b), t_s.double())


def load_items(
    cache_dir: Path, splits: Sequence[str], progress: Callable[[int], None] | None = None
) -> list[Item]:
    items = []
    for zm in iter_zoo(cache_dir, tuple(splits)):
        items.append(make_item(zm))
        if progress:
            progress(1)
    return items


# ------------------------------------------------------------------------------------ loss
@dataclass
class LossParts:
    """Per-draw errors ``[R]``: NMAE and mean |log-ratio| per channel, |log-ratio| per scalar
    (NaN where missing)."""

    nmae: Tensor  # [R, K]
    logerr: Tensor  # [R, K]
    scalar: Tensor  # [R, S]


def _channel_errors(
    logp: Tensor, t: Tensor, unit: Tensor, dims: tuple[int, ...]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sums for one tensor of one channel: (Σ u|p-t|, Σ u|t|, Σ |log err|, count)."""
    p = torch.exp(logp)
    abs_err = ((p - t).abs().sum(dims)) * unit
    abs_true = t.abs().sum(dims) * unit
    floor = TARGET_FLOOR * t.mean(dims, keepdim=True)
    logerr = (logp - torch.log(t + floor + 1e-30)).abs().sum(dims)
    count = torch.full_like(abs_err, float(math.prod(t.shape[d] for d in dims)))
    return abs_err, abs_true, logerr, count


def loss_parts(inp: HeadInput, out: HeadOutput, item: Item) -> LossParts:
    """Errors of the head's predictions against the truth (normalised units)."""
    logp = log_prediction(inp, out)
    K = len(PARAM_TARGETS)
    nmae, logerr = [], []
    R = inp.plug_scalars.shape[0] if inp.plug_scalars.dim() > 1 else 1
    for k in range(K):
        parts = []
        for l in range(inp.depth):
            parts.append((logp.param[l][..., k], item.t_w[l][..., k], inp.unit_w[l], (-2, -1)))
            if item.t_b[l] is not None and logp.bias[l] is not None:
                parts.append((logp.bias[l][..., k], item.t_b[l][..., k], inp.unit_b[l], (-1,)))
        if not all(bool(torch.isfinite(t).all()) for _, t, _, _ in parts):
            missing = torch.full((R,), math.nan, dtype=out.scalars.dtype)  # no graph, no NaN grads
            nmae.append(missing)
            logerr.append(missing)
            continue
        sums = [0.0, 0.0, 0.0, 0.0]
        for lp, t, u, dims in parts:
            got = _channel_errors(lp, t, u.to(lp.dtype), dims)
            sums = [s + g for s, g in zip(sums, got, strict=True)]
        nmae.append(sums[0] / sums[1])
        logerr.append(sums[2] / sums[3])
    t_s = item.t_s.to(out.scalars.dtype)
    valid = torch.isfinite(t_s) & (t_s > 0)
    scalar = (logp.scalars - torch.log(torch.where(valid, t_s, torch.ones_like(t_s)))).abs()
    scalar = torch.where(valid, scalar, torch.full_like(scalar, math.nan))
    return LossParts(torch.stack(nmae, -1), torch.stack(logerr, -1), scalar)


def total_loss(parts: LossParts, cfg: TrainConfig) -> Tensor:
    """Scalar training loss (NaN parts are skipped)."""
    weights = [1.0, cfg.obs_weight]
    total = parts.scalar.new_zeros(())
    for k, w in enumerate(weights):
        per = parts.nmae[:, k] + cfg.log_weight * parts.logerr[:, k]
        if bool(torch.isfinite(per).all()):  # missing channels are constant NaN (no graph)
            total = total + w * per.mean()
    sc = parts.scalar
    ok = torch.isfinite(sc)
    # masked entries of `sc` come from finite values (see loss_parts): zero gradient, no NaN
    total = total + cfg.scalar_weight * torch.where(ok, sc, torch.zeros_like(sc)).sum(-1).mean()
    return total


# -------------------------------------------------------------------------------- metrics
def evaluate_items(model: GradMetaNet, items: Sequence[Item]) -> dict[str, float]:
    """Mean errors of head and plug-in (zero log-ratios) over items' draws."""
    model.eval()
    acc: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for it in items:
            out = model(it.inp)
            zero = HeadOutput(
                tuple(torch.zeros_like(w) for w in out.w),
                tuple(None if b is None else torch.zeros_like(b) for b in out.b),
                torch.zeros_like(out.scalars),
            )
            for who, o in (("head", out), ("plug", zero)):
                p = loss_parts(it.inp, o, it)
                for k, name in enumerate(PARAM_TARGETS):
                    acc.setdefault(f"{who}.{name}.nmae", []).append(p.nmae[:, k])
                    acc.setdefault(f"{who}.{name}.logerr", []).append(p.logerr[:, k])
                for s, name in enumerate(SCALAR_TARGETS):
                    acc.setdefault(f"{who}.{name}.logerr", []).append(p.scalar[:, s])
    model.train()
    out: dict[str, float] = {}
    for k, v in acc.items():
        t = torch.cat(v)
        t = t[torch.isfinite(t)]
        out[k] = float(t.mean()) if len(t) else math.nan
    return out


# ---------------------------------------------------------------------------- checkpoints
def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    sd = opt.state_dict()
    tensors, state_meta = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"opt.{pid}.{k}"] = v.detach().clone().contiguous()
            else:
                state_meta[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": state_meta}


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict):
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: Path, model, opt, progress: dict) -> None:
    """Model + optimizer tensors in safetensors, counters/config/history in its metadata."""
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    opt_t, opt_meta = _flatten_optimizer(opt)
    tensors.update(opt_t)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        tensors, str(tmp), metadata={"progress": json.dumps(progress), "opt": json.dumps(opt_meta)}
    )
    tmp.replace(path)


def load_checkpoint(path: Path, model, opt) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    model.load_state_dict(
        {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    )
    _unflatten_optimizer(
        opt, {k: v for k, v in tensors.items() if k.startswith("opt.")}, json.loads(meta["opt"])
    )
    return json.loads(meta["progress"])


# ----------------------------------------------------------------------------------- train
@dataclass
class TrainResult:
    model: GradMetaNet
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    val_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    steps: int = 0


ProgressFn = Callable[[dict], None]


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def train_head(
    train_items: Sequence[Item],
    val_items: Sequence[Item],
    head_config: HeadConfig | None = None,
    cfg: TrainConfig | None = None,
    checkpoint: Path | None = None,
    progress: ProgressFn | None = None,
    max_steps: int | None = None,
    init_state: dict[str, Tensor] | None = None,
) -> TrainResult:
    """Train a head; resume from `checkpoint` when it exists (same configs required).

    `progress` receives ``{"event": "step"|"epoch", ...}`` dicts. `max_steps` stops early
    (smoke tests). `init_state` starts from another head's weights (fine-tuning; same
    `HeadConfig`) instead of the plug-in-reproducing initialisation. Returns the model with
    the best validation loss of any epoch end (the starting weights count as epoch -1 when
    `init_state` is given: fine-tuning never returns a head worse on `val_items`).
    """
    cfg = cfg or TrainConfig()
    head_config = head_config or HeadConfig()
    if not train_items:
        raise ConfigError("no training models in the zoo", hint="build it: gmcurv head zoo")
    model = GradMetaNet(head_config, seed=cfg.seed)
    if init_state is not None:
        model.load_state_dict({k: v.to(torch.float32) for k, v in init_state.items()})
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(train_items) / cfg.models_per_step)
    total = per_epoch * cfg.epochs
    state = {
        "epoch": 0,
        "position": 0,
        "step": 0,
        "history": [],
        "best": math.inf,
        "best_epoch": -1,
        "seconds": 0.0,
        "config": cfg.to_dict(),
        "head": head_config.to_dict(),
        "n_train": len(train_items),
    }
    best_state = None
    if init_state is not None and val_items:
        start = evaluate_items(model, val_items)
        state["best"] = start.get("head.fisher_diag.nmae", math.inf)
        state["history"].append({"epoch": -1, "step": 0, "seconds": 0.0, **start})
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if checkpoint is not None and Path(checkpoint).exists():
        saved = load_checkpoint(Path(checkpoint), model, opt)
        if saved["config"] != cfg.to_dict() or saved["head"] != head_config.to_dict():
            raise ConfigError(
                f"{checkpoint} was written with other settings",
                hint="use the same options to resume, or another --checkpoint",
            )
        state = saved
        best_path = Path(checkpoint).with_suffix(".best.safetensors")
        if best_path.exists():
            with safe_open(str(best_path), "pt") as f:
                best_state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    t0 = time.perf_counter() - state["seconds"]
    model.train()
    while state["epoch"] < cfg.epochs:
        order = torch.randperm(
            len(train_items),
            generator=torch.Generator().manual_seed(cfg.seed * 1000 + state["epoch"]),
        ).tolist()
        while state["position"] < len(order):
            chunk = order[state["position"] : state["position"] + cfg.models_per_step]
            for g in opt.param_groups:
                g["lr"] = _lr_at(state["step"], total, cfg)
            opt.zero_grad()
            loss_sum = 0.0
            for i in chunk:
                it = train_items[i]
                loss = total_loss(loss_parts(it.inp, model(it.inp), it), cfg) / len(chunk)
                loss.backward()
                loss_sum += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            state["position"] += len(chunk)
            state["step"] += 1
            state["seconds"] = time.perf_counter() - t0
            if progress:
                progress(
                    {
                        "event": "step",
                        "epoch": state["epoch"],
                        "step": state["step"],
                        "total": total,
                        "loss": loss_sum,
                    }
                )
            if checkpoint is not None and state["step"] % cfg.checkpoint_every == 0:
                save_checkpoint(Path(checkpoint), model, opt, state)
            if max_steps is not None and state["step"] >= max_steps:
                return TrainResult(
                    model,
                    state["history"],
                    state["best_epoch"],
                    {},
                    state["seconds"],
                    state["step"],
                )
        metrics = evaluate_items(model, val_items) if val_items else {}
        val_loss = metrics.get("head.fisher_diag.nmae", math.nan)
        entry = {"epoch": state["epoch"], "step": state["step"], "seconds": state["seconds"]}
        entry.update(metrics)
        state["history"].append(entry)
        if not val_items or val_loss < state["best"]:
            state["best"], state["best_epoch"] = val_loss if val_items else 0.0, state["epoch"]
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if checkpoint is not None:
                save_file(best_state, str(Path(checkpoint).with_suffix(".best.safetensors")))
        state["epoch"] += 1
        state["position"] = 0
        if checkpoint is not None:
            save_checkpoint(Path(checkpoint), model, opt, state)
        if progress:
            progress({"event": "epoch", **entry, "total": total})
    if best_state is not None:
        model.load_state_dict(best_state)
    best = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), {})
    return TrainResult(
        model,
        state["history"],
        state["best_epoch"],
        {k: v for k, v in best.items() if "." in k},
        state["seconds"],
        state["step"],
    )


def with_epochs(cfg: TrainConfig, epochs: int) -> TrainConfig:
    return replace(cfg, epochs=epochs)
