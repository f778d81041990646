"""Head v2's model zoo: small causal-LM transformers with exact targets (resumable).

Each *group* trains one `TinyLM` (1-4 blocks, width 32-128, 1-4 heads) on one task of
`gmcurv.gradmetanet.tlm` with Adam and snapshots it after several numbers of steps. Per
snapshot, on ``n_truth`` sequences (the "full data" of that model), with the engine:

- Fisher diagonal and trace (empirical, next-token loss summed per sequence), closed forms;
- OBS curvature ``1/[(F + eps I)^-1]_qq`` (Woodbury, block-diagonal F, `default_eps`);
- Hessian trace by Hutch++ on Hessian-vector products, budgets doubled until the standard
  error is <= 1 % of |value| (or `MAX_HVPS`; reached or not is recorded);
- top Hessian eigenvalue by Lanczos (tol 1e-4), residual and convergence recorded;

plus `draws` random sets of ``b`` sequences kept as per-token factors ``(a, delta)`` of every
Linear layer (the head's input). The seconds of each target are recorded: the zoo's cost.

On disk (``cache_dir``, never in git): ``plan.json``, ``groups/<gid>.safetensors`` (weights,
targets, draws; JSON metadata in the header). A group whose file exists is skipped, so an
interrupted build resumes; `max_groups` bounds one run.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from gmcurv.capture import capture_all
from gmcurv.errors import ConfigError
from gmcurv.factors import LinearFactors
from gmcurv.fisher import fisher_diagonal, fisher_trace
from gmcurv.gradmetanet.targets import top_hessian_eigenvalue
from gmcurv.gradmetanet.tlm import TASKS, TinyLM, init_lm, make_task
from gmcurv.io.data import load_data
from gmcurv.io.fileio import atomic_write_text
from gmcurv.objective import Objective
from gmcurv.operator import CurvatureOperator
from gmcurv.stochastic import hutchpp
from gmcurv.woodbury import DampedFisher, default_eps

TZOO_VERSION = 1
T = 32
N_TRUTH = 256
SET_SIZE = 16
MAX_HVPS = 480
HELD_OUT_TASK = "chars"
ARCHS = ((1, 32, 1), (1, 64, 2), (2, 32, 2), (2, 64, 4), (3, 48, 2), (4, 32, 4), (2, 128, 4))
HELD_OUT_ARCHS = ((3, 96, 3), (1, 128, 1))
SNAPSHOTS = (0, 50, 200, 600)
SPLITS = ("train", "val", "test-task", "test-arch")

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class LMGroupSpec:
    gid: str
    task: str
    layers: int
    width: int
    heads: int
    seed: int
    lr: float
    steps: tuple[int, ...]
    split: str
    draws: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LMGroupSpec:
        return cls(**{**d, "steps": tuple(d["steps"])})


def tzoo_plan(seed: int = 0) -> list[LMGroupSpec]:
    """Every training task x training architecture (``train``; a second seed of one in four
    is ``val``), the held-out task ``chars`` on every architecture (``test-task``) and the
    held-out architectures on the training tasks (``test-arch``). Training groups come first,
    interleaved with the held-out ones so that a bounded build covers every split."""
    rng = random.Random(seed)
    train_tasks = [t for t in TASKS if t != HELD_OUT_TASK]
    out: list[LMGroupSpec] = []

    def add(task, arch, split, draws):
        layers, width, heads = arch
        out.append(
            LMGroupSpec(
                f"{split}-{task}-L{layers}d{width}h{heads}-{len(out):04d}",
                task, layers, width, heads, rng.randrange(2**31),
                10 ** rng.uniform(-3.2, -2.3), SNAPSHOTS, split, draws,
            )
        )  # fmt: skip

    for i, arch in enumerate(ARCHS):
        for task in train_tasks:
            add(task, arch, "train", 3)
        if i % 2 == 0:
            add(train_tasks[i % len(train_tasks)], arch, "val", 3)
        add(HELD_OUT_TASK, arch, "test-task", 4)
    for j, arch in enumerate(HELD_OUT_ARCHS):
        for task in train_tasks[j::2]:
            add(task, arch, "test-arch", 4)
    return out


def train_snapshots(spec: LMGroupSpec, ids: Tensor, vocab: int) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(spec.seed)
    model = TinyLM(vocab, spec.width, spec.layers, spec.heads, T)
    init_lm(model, gen)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    out, step = [], 0
    for target in sorted(spec.steps):
        while step < target:
            idx = torch.randint(0, len(ids), (32,), generator=gen)
            logits = model(ids[idx])
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, vocab), ids[idx][:, 1:].reshape(-1)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def hessian_trace_to(op: CurvatureOperator, rtol: float = 0.01, seed: int = 0) -> dict:
    """Hutch++ with doubling budgets until ``stderr <= rtol |value|`` or `MAX_HVPS`."""
    budget = 30
    while True:
        est = hutchpp(op.matvec, op.size, budget, seed=seed)
        ok = est.stderr is not None and est.stderr <= rtol * abs(est.value)
        if ok or budget >= MAX_HVPS:
            return {"value": est.value, "stderr": est.stderr, "hvps": budget, "reached": ok}
        budget = min(2 * budget, MAX_HVPS)


def build_group(spec: LMGroupSpec, cache_dir: Path) -> Path:
    """Train, compute targets and draws for every snapshot; write ``groups/<gid>``."""
    torch.set_num_threads(1)
    ids, vocab = make_task(spec.task, N_TRUTH + 512, T, seed=1000 + TASKS.index(spec.task))
    truth_ids = ids[:N_TRUTH]
    states = train_snapshots(spec, ids[N_TRUTH:], vocab)
    tensors: dict[str, Tensor] = {}
    meta = []
    gen = torch.Generator().manual_seed(spec.seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "truth.safetensors"
        save_file({"inputs": truth_ids.contiguous()}, str(path))
        data = load_data(path)
        for k, (step, state) in enumerate(zip(sorted(spec.steps), states, strict=True)):
            model = TinyLM(vocab, spec.width, spec.layers, spec.heads, T).double()
            model.load_state_dict({n: v.double() for n, v in state.items()})
            obj = Objective.build(model, "next_token")
            sec: dict[str, float] = {}
            t0 = time.perf_counter()
            dg = capture_all(obj, data, 64)
            diag = fisher_diagonal(dg)
            sec["fisher"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            eps = default_eps(dg)
            inv = DampedFisher(dg, eps, "block").inverse_diagonal()
            sec["obs"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            op = CurvatureOperator(obj, data, 64, kind="hessian")
            tr = hessian_trace_to(op, seed=spec.seed)
            sec["hessian_trace"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            top = top_hessian_eigenvalue(obj, data, 64, tol=1e-4, seed=spec.seed)
            sec["hessian_top"] = time.perf_counter() - t0
            for name, v in state.items():
                tensors[f"s{k}.w.{name}"] = v.float().contiguous()
            for name, v in diag.items():
                tensors[f"s{k}.t.fisher_diag.{name}"] = v.double().contiguous()
                tensors[f"s{k}.t.obs_curv.{name}"] = (1.0 / inv[name]).double().contiguous()
            for r in range(spec.draws):
                idx = torch.randperm(dg.n, generator=gen)[:SET_SIZE].sort().values
                sub = dg.select(idx)
                tensors[f"s{k}.d{r}.index"] = idx
                tensors[f"s{k}.d{r}.losses"] = sub.losses.float()
                for blk in sub.blocks:
                    if isinstance(blk.source, LinearFactors):
                        tensors[f"s{k}.d{r}.x.{blk.name}"] = blk.source.x.float().contiguous()
                        tensors[f"s{k}.d{r}.delta.{blk.name}"] = (
                            blk.source.delta.float().contiguous()
                        )
            meta.append(
                {
                    "step": step,
                    "n": dg.n,
                    "b": SET_SIZE,
                    "vocab": vocab,
                    "fisher_trace": fisher_trace(dg),
                    "hessian_trace": tr,
                    "hessian_top": float(top.values[0]),
                    "hessian_top_residual": float(top.residuals[0]),
                    "hessian_top_converged": bool(top.converged[0]),
                    "hessian_top_matvecs": top.n_matvecs,
                    "eps": eps,
                    "seconds": sec,
                    "n_params": sum(int(v.numel()) for v in state.values()),
                }
            )
    out = cache_dir / "groups" / f"{spec.gid}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    header = {"spec": json.dumps(spec.to_dict()), "snapshots": json.dumps(meta)}
    save_file(tensors, str(tmp_out), metadata={**header, "tzoo": str(TZOO_VERSION)})
    tmp_out.replace(out)
    return out


def build_tzoo(
    cache_dir: Path,
    seed: int = 0,
    max_groups: int | None = None,
    progress: ProgressFn | None = None,
) -> list[LMGroupSpec]:
    """Build (or resume) the transformer zoo; at most `max_groups` new groups this run."""
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan = tzoo_plan(seed)
    plan_file = cache_dir / "plan.json"
    if plan_file.exists() and json.loads(plan_file.read_text()).get("seed") != seed:
        raise ConfigError(
            f"{cache_dir} holds a transformer zoo of another seed",
            hint="use another cache dir, or the same seed to resume",
        )
    atomic_write_text(
        plan_file,
        json.dumps({"tzoo": TZOO_VERSION, "seed": seed, "groups": [s.to_dict() for s in plan]}),
    )
    todo = [s for s in plan if not (cache_dir / "groups" / f"{s.gid}.safetensors").exists()]
    if max_groups is not None:
        todo = todo[:max_groups]
    done = len(plan) - len(todo)
    for s in todo:
        build_group(s, cache_dir)
        done += 1
        if progress:
            progress(done, len(plan))
    return plan
