"""Head v2's model zoo: small causal-LM transformers with exact targets (resumable).

Each *group* trains one causal LM on one task of `gmcurv.gradmetanet.tlm` with Adam and
snapshots it after several numbers of steps: a `TinyLM` (1-3 blocks, width 32-64, 1-4
heads), or (split ``test-hf``) a ``transformers`` GPT2LMHeadModel / LlamaForCausalLM built
from a tiny config, trained with its own ``outputs.loss``, written by ``save_pretrained``
and read back by `gmcurv.io.checkpoint.load_model`. Per snapshot, on `N_TRUTH` sequences (the
"full data" of that model), with the engine:

- Fisher diagonal and trace (empirical, next-token loss summed per sequence), closed forms;
- OBS curvature ``1/[(F + eps I)^-1]_qq`` (Woodbury, block-diagonal F, `default_eps`);
- Hessian trace by Hutch++ with a fixed budget of `HUTCHPP_HVPS` Hessian-vector products
  (its standard error is recorded, and whether it is <= 1 % of |value|: near init the
  trace is close to zero and no budget reaches 1 %);
- top Hessian eigenvalue by Lanczos (tol `LANCZOS_TOL`), residual and convergence recorded;

plus `draws` random sets of ``b`` sequences kept as per-token factors ``(a, delta)`` of every
Linear layer (the head's input). The seconds of each target are recorded: the zoo's cost.

On disk (``cache_dir``, never in git): ``plan.json``, ``groups/<gid>.safetensors`` (weights,
targets, draws; JSON metadata in the header). A group whose file exists is skipped, so an
interrupted build resumes; `max_groups` bounds one run. Each finished group appends its
cost (wall and CPU seconds, load average, seconds per target) to ``cost.jsonl``.

Version 2 (this session) is sized for a 2-core machine shared by 7 agents, where a nice-10
job got about 7 % of a core and a nice-19 job 1 % (load 12): 16 groups of 1-3 blocks of
width 32-48, about 20-60 CPU-seconds each (the 35-group v1 plan with Hutch++ to 1 % took
> 4 CPU-minutes per model). Groups 0-2 were built with 64 truth sequences, 90 Hutch++
products, 30 Lanczos iterations and training batches of 32 before the plan was shrunk.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import tempfile
import time
import warnings
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
from gmcurv.io.checkpoint import load_model
from gmcurv.io.data import load_data
from gmcurv.io.fileio import atomic_write_text
from gmcurv.objective import Objective
from gmcurv.operator import CurvatureOperator
from gmcurv.stochastic import hutchpp
from gmcurv.woodbury import DampedFisher, default_eps

TZOO_VERSION = 2
T = 32
N_TRUTH = 48  # groups 0-2 of the v2 build used 64 (their metadata's "n")
SET_SIZE = 16
HUTCHPP_HVPS = 60  # 90 for groups 0-2
LANCZOS_TOL = 1e-3
LANCZOS_ITERS = 20
HELD_OUT_TASK = "chars"
TRAIN_BATCH = 16
SNAPSHOTS = (0, 100, 400)
SNAP_B = (0, 50, 250, 1000)  # training lengths of the zoo's third session (groups >= 16)
SNAP_C = (20, 200, 800)
ZOO_TASKS = (*TASKS, "reverse", "sort", "dyck", "modsum")  # TASKS keep their seeds
SPLITS = ("train", "val", "test-task", "test-arch", "test-hf")

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
    family: str = "tiny"  # "tiny" (TinyLM), "gpt2" or "llama" (transformers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LMGroupSpec:
        return cls(**{**d, "steps": tuple(d["steps"])})


PLAN = (  # (split, task, family, (blocks, width, heads)[, snapshot steps]), in build order
    ("train", "markov", "tiny", (1, 32, 1)),
    ("train", "copy", "tiny", (1, 32, 1)),
    ("train", "count", "tiny", (1, 32, 1)),
    ("test-hf", "markov", "gpt2", (1, 32, 2)),
    ("test-task", HELD_OUT_TASK, "tiny", (1, 32, 1)),
    ("test-hf", HELD_OUT_TASK, "llama", (1, 32, 2)),
    ("train", "markov", "tiny", (2, 32, 2)),
    ("test-arch", "copy", "tiny", (1, 48, 2)),  # unseen width
    ("train", "copy", "tiny", (2, 32, 2)),
    ("val", "markov", "tiny", (1, 32, 2)),
    ("train", "count", "tiny", (2, 32, 2)),
    ("test-task", HELD_OUT_TASK, "tiny", (2, 32, 2)),
    ("test-arch", "count", "tiny", (3, 32, 2)),  # unseen depth
    ("test-hf", HELD_OUT_TASK, "gpt2", (1, 32, 2)),
    ("test-hf", "markov", "llama", (1, 32, 2)),
    ("val", "count", "tiny", (2, 32, 1)),
    # third session: more tasks (`zoo_task`), widths 32/64, 1/2/4 blocks, 1/2/4 heads and
    # three training lengths for train/val; unseen widths 48/96/128 and depth 3 stay held out
    ("train", "reverse", "tiny", (1, 32, 2), SNAP_B),
    ("train", "sort", "tiny", (1, 32, 4), SNAP_C),
    ("train", "dyck", "tiny", (2, 32, 4), SNAP_B),
    ("train", "modsum", "tiny", (1, 64, 2), SNAP_C),
    ("val", "copy", "tiny", (1, 32, 4), SNAP_B),
    ("train", "markov", "tiny", (1, 64, 4), SNAP_C),
    ("train", "copy", "tiny", (4, 32, 2), SNAPSHOTS),
    ("test-task", HELD_OUT_TASK, "tiny", (1, 64, 2), SNAP_B),
    ("train", "count", "tiny", (1, 64, 1), SNAP_B),
    ("train", "reverse", "tiny", (2, 64, 2), SNAPSHOTS),
    ("val", "dyck", "tiny", (1, 64, 2), SNAP_C),
    ("train", "sort", "tiny", (2, 32, 1), SNAP_B),
    ("train", "dyck", "tiny", (1, 32, 1), SNAPSHOTS),
    ("train", "modsum", "tiny", (2, 32, 4), SNAP_B),
    ("test-arch", "markov", "tiny", (1, 96, 3), SNAPSHOTS),  # unseen width
    ("test-hf", "sort", "gpt2", (2, 48, 4), SNAP_B),
    ("train", "markov", "tiny", (4, 32, 4), SNAP_B),
    ("train", "copy", "tiny", (1, 64, 2), SNAP_C),
    ("val", "modsum", "tiny", (2, 32, 2), SNAPSHOTS),
    ("test-hf", "dyck", "llama", (2, 32, 4), SNAP_C),
    ("train", "count", "tiny", (4, 32, 1), SNAP_C),
    ("train", "reverse", "tiny", (1, 32, 1), SNAP_C),
    ("train", "sort", "tiny", (1, 64, 4), SNAPSHOTS),
    ("train", "dyck", "tiny", (2, 64, 2), SNAP_C),
    ("train", "modsum", "tiny", (1, 32, 1), SNAPSHOTS),
    ("test-arch", "dyck", "tiny", (3, 48, 3), SNAP_B),  # unseen width and depth
    ("val", "sort", "tiny", (2, 64, 1), SNAP_B),
    ("test-task", HELD_OUT_TASK, "tiny", (4, 32, 4), SNAP_C),
    ("train", "markov", "tiny", (2, 64, 1), SNAPSHOTS),
    ("train", "copy", "tiny", (2, 32, 4), SNAP_C),
    ("test-hf", "count", "gpt2", (2, 32, 4), SNAPSHOTS),
    ("test-hf", "modsum", "llama", (1, 64, 4), SNAP_B),
    ("train", "count", "tiny", (2, 64, 4), SNAP_C),
    ("train", "reverse", "tiny", (4, 32, 2), SNAP_B),
    ("test-arch", "copy", "tiny", (1, 128, 4), SNAPSHOTS),  # unseen width
    ("val", "reverse", "tiny", (1, 64, 4), SNAP_C),
    ("train", "sort", "tiny", (4, 32, 2), SNAP_C),
    ("train", "dyck", "tiny", (1, 64, 1), SNAP_B),
    ("train", "modsum", "tiny", (2, 64, 2), SNAP_C),
    ("train", "markov", "tiny", (1, 32, 4), SNAP_C),
    ("test-hf", "reverse", "gpt2", (1, 64, 4), SNAP_C),
    ("test-hf", "copy", "llama", (2, 48, 2), SNAPSHOTS),
    # session 18: GPT-2 / Llama training groups (a per-family term needs them) and fresh
    # held-out groups nobody has evaluated: transformers' own models, unseen widths 80/112
    # and depth 3, the held-out task
    ("train", "markov", "gpt2", (1, 32, 2), SNAP_B),
    ("train", "markov", "llama", (2, 32, 2), SNAP_C),
    ("test-hf", "copy", "gpt2", (2, 32, 2), SNAP_B),
    ("train", "copy", "gpt2", (2, 32, 4), SNAP_C),
    ("train", "copy", "llama", (1, 64, 4), SNAPSHOTS),
    ("test-hf", "sort", "llama", (1, 32, 4), SNAP_C),
    ("train", "count", "gpt2", (1, 64, 2), SNAPSHOTS),
    ("train", "count", "llama", (2, 32, 4), SNAP_B),
    ("test-arch", "reverse", "tiny", (1, 80, 4), SNAP_C),  # unseen width
    ("val", "copy", "gpt2", (1, 64, 4), SNAP_C),
    ("val", "markov", "llama", (1, 32, 2), SNAPSHOTS),
    ("train", "reverse", "gpt2", (2, 64, 4), SNAP_B),
    ("train", "reverse", "llama", (1, 32, 2), SNAP_C),
    ("test-hf", "dyck", "gpt2", (1, 48, 4), SNAP_C),
    ("train", "sort", "gpt2", (1, 32, 4), SNAP_C),
    ("train", "sort", "llama", (2, 64, 2), SNAPSHOTS),
    ("test-arch", "modsum", "tiny", (3, 32, 2), SNAP_B),  # unseen depth
    ("train", "dyck", "gpt2", (2, 32, 2), SNAPSHOTS),
    ("train", "dyck", "llama", (1, 64, 4), SNAP_B),
    ("test-hf", "count", "llama", (2, 64, 2), SNAP_B),
    ("train", "modsum", "gpt2", (1, 64, 1), SNAP_B),
    ("train", "modsum", "llama", (2, 32, 2), SNAP_C),
    ("test-task", HELD_OUT_TASK, "tiny", (2, 64, 4), SNAP_B),
    ("test-hf", "modsum", "gpt2", (2, 64, 2), SNAPSHOTS),
    ("test-arch", "sort", "tiny", (1, 112, 4), SNAPSHOTS),  # unseen width
    ("test-hf", "reverse", "llama", (1, 48, 2), SNAPSHOTS),
)


def tzoo_plan(seed: int = 0) -> list[LMGroupSpec]:
    """`PLAN` with seeds and learning rates drawn from `seed`: training tasks on 1-2 blocks of
    width 32 (``train``, ``val``), the held-out task ``chars`` (``test-task``), an unseen
    width and depth (``test-arch``) and transformers' own GPT-2 / Llama (``test-hf``). The
    splits are interleaved so that a bounded build covers all of them early."""
    rng = random.Random(seed)
    out = []
    for i, (split, task, fam, (layers, width, heads), *steps) in enumerate(PLAN):
        draws = (8 if i < 16 else 12) if split == "train" else 4
        out.append(
            LMGroupSpec(
                f"{split}-{task}-{fam}-L{layers}d{width}h{heads}-{i:04d}",
                task, layers, width, heads, rng.randrange(2**31),
                10 ** rng.uniform(-3.2, -2.3), tuple(steps[0]) if steps else SNAPSHOTS,
                split, draws, fam,
            )
        )  # fmt: skip
    return out


def _brackets(n: int, T: int, gen: torch.Generator) -> Tensor:
    """Random well-nested sequences over two bracket kinds (``(``=1 ``)``=2 ``[``=3 ``]``=4),
    closed at the end where possible, padded with 0; the model must track the stack."""
    out = torch.zeros(n, T, dtype=torch.long)
    u = torch.rand(n, T, generator=gen)
    kinds = torch.randint(0, 2, (n, T), generator=gen)
    for i in range(n):
        stack: list[int] = []
        for t in range(T):
            if stack and (u[i, t] < 0.45 or len(stack) >= T - t):
                out[i, t] = 2 + 2 * stack.pop()
            elif len(stack) < T - t - 1:
                k = int(kinds[i, t])
                stack.append(k)
                out[i, t] = 1 + 2 * k
    return out


def zoo_task(name: str, n: int, T: int, seed: int) -> tuple[Tensor, int]:
    """`tlm.make_task` plus the zoo's extra synthetic tasks (deterministic in `seed`):
    ``reverse`` / ``sort`` (a random prefix, a separator 0, then the prefix reversed /
    sorted), ``dyck`` (nested brackets of two kinds), ``modsum`` (digits interleaved with
    their running sum modulo 17)."""
    if name in TASKS:
        return make_task(name, n, T, seed)
    gen = torch.Generator().manual_seed(seed)
    if name in ("reverse", "sort"):
        V, half = 16, (T - 1) // 2
        prefix = torch.randint(1, V, (n, half), generator=gen)
        tail = prefix.flip(1) if name == "reverse" else prefix.sort(1).values
        ids = torch.cat([prefix, torch.zeros(n, 1, dtype=torch.long), tail], 1)
        return torch.cat([ids, torch.zeros(n, T - ids.shape[1], dtype=torch.long)], 1), V
    if name == "dyck":
        return _brackets(n, T, gen), 5
    if name == "modsum":
        V = 17
        a = torch.randint(0, V, (n, (T + 1) // 2), generator=gen)
        s = a.cumsum(1) % V
        return torch.stack([a, s], 2).reshape(n, -1)[:, :T].contiguous(), V
    raise ValueError(f"unknown task {name!r}; use one of {ZOO_TASKS}")


def task_ids(task: str, n: int) -> tuple[Tensor, int]:
    """The zoo's sequences of `task`: ``n`` truth sequences then 512 for training."""
    return zoo_task(task, n + 512, T, seed=1000 + ZOO_TASKS.index(task))


def hf_model(spec: LMGroupSpec, vocab: int) -> torch.nn.Module:
    """A ``transformers`` causal LM of the spec's size (random init by its own code)."""
    import transformers as tf

    torch.manual_seed(spec.seed)
    d, L, h = spec.width, spec.layers, spec.heads
    if spec.family == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=vocab, n_positions=T, n_embd=d, n_layer=L, n_head=h,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = tf.GPT2LMHeadModel(cfg)
    elif spec.family == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=L,
            num_attention_heads=h, num_key_value_heads=h, max_position_embeddings=T,
        )  # fmt: skip
        model = tf.LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"unknown family {spec.family!r}")
    model.config._attn_implementation = "eager"
    return model


def train_snapshots(spec: LMGroupSpec, ids: Tensor, vocab: int) -> list[dict[str, Tensor]]:
    """Adam on batches of 32 sequences; the state dict after each of ``spec.steps``."""
    gen = torch.Generator().manual_seed(spec.seed)
    if spec.family == "tiny":
        model = TinyLM(vocab, spec.width, spec.layers, spec.heads, T)
        init_lm(model, gen)
    else:
        model = hf_model(spec, vocab)
    model.train(False)  # no dropout: the targets are of the deterministic model
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    out, step = [], 0
    for target in sorted(spec.steps):
        while step < target:
            idx = torch.randint(0, len(ids), (TRAIN_BATCH,), generator=gen)
            if spec.family == "tiny":
                logits = model(ids[idx])
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, vocab), ids[idx][:, 1:].reshape(-1)
                )
            else:
                loss = model(input_ids=ids[idx], labels=ids[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def hessian_trace_to(op: CurvatureOperator, rtol: float = 0.01, seed: int = 0) -> dict:
    """Hutch++ with `HUTCHPP_HVPS` products; ``reached``: ``stderr <= rtol |value|``."""
    est = hutchpp(op.matvec, op.size, HUTCHPP_HVPS, seed=seed)
    ok = est.stderr is not None and est.stderr <= rtol * abs(est.value)
    return {"value": est.value, "stderr": est.stderr, "hvps": HUTCHPP_HVPS, "reached": ok}


def _snapshot_objective(spec: LMGroupSpec, state, vocab: int, tmp: Path, k: int):
    """(float64 Objective, float32 state dict to store) of one snapshot."""
    if spec.family == "tiny":
        model = TinyLM(vocab, spec.width, spec.layers, spec.heads, T).double()
        model.load_state_dict({n: v.double() for n, v in state.items()})
        return Objective.build(model, "next_token"), state
    out = tmp / f"hf{k}"
    model = hf_model(spec, vocab)
    model.load_state_dict(state)
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(str(out))
    with warnings.catch_warnings():  # "eval mode: Dropout is off" is what the zoo wants
        warnings.simplefilter("ignore")
        lm = load_model(out, dtype=torch.float64)
        obj = Objective.build(lm.model, lm.loss)
    sd = {n: v.detach().float() for n, v in lm.model.state_dict().items()}
    return obj, sd


def build_group(spec: LMGroupSpec, cache_dir: Path) -> Path:
    """Train, compute targets and draws for every snapshot; write ``groups/<gid>``."""
    torch.set_num_threads(1)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    ids, vocab = task_ids(spec.task, N_TRUTH)
    truth_ids = ids[:N_TRUTH]
    states = train_snapshots(spec, ids[N_TRUTH:], vocab)
    train_cpu = time.process_time() - cpu0
    tensors: dict[str, Tensor] = {}
    meta = []
    gen = torch.Generator().manual_seed(spec.seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "truth.safetensors"
        key = "inputs" if spec.family == "tiny" else "input_ids"
        save_file({key: truth_ids.contiguous()}, str(path))
        data = load_data(path)
        for k, (step, state) in enumerate(zip(sorted(spec.steps), states, strict=True)):
            obj, sd = _snapshot_objective(spec, state, vocab, Path(tmp), k)
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
            top = top_hessian_eigenvalue(
                obj, data, 64, tol=LANCZOS_TOL, max_iters=LANCZOS_ITERS, seed=spec.seed
            )
            sec["hessian_top"] = time.perf_counter() - t0
            for name, v in sd.items():
                if v.is_floating_point():
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
                    "n_params": obj.space.size,
                }
            )
    out = cache_dir / "groups" / f"{spec.gid}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    header = {"spec": json.dumps(spec.to_dict()), "snapshots": json.dumps(meta)}
    save_file(tensors, str(tmp_out), metadata={**header, "tzoo": str(TZOO_VERSION)})
    tmp_out.replace(out)
    cost = {
        "gid": spec.gid,
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
        "train_cpu_s": train_cpu,
        "loadavg": os.getloadavg()[0],
        "n_params": meta[0]["n_params"],
        "seconds": [m["seconds"] for m in meta],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with open(cache_dir / "cost.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(cost) + "\n")
    return out


def build_tzoo(
    cache_dir: Path,
    seed: int = 0,
    max_groups: int | None = None,
    progress: ProgressFn | None = None,
    shard: tuple[int, int] = (0, 1),
) -> list[LMGroupSpec]:
    """Build (or resume) the transformer zoo; at most `max_groups` new groups this run.
    ``shard=(k, m)``: only plan entries ``i`` with ``i % m == k`` (m processes in parallel)."""
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
    k, m = shard
    todo = [
        s
        for i, s in enumerate(plan)
        if i % m == k and not (cache_dir / "groups" / f"{s.gid}.safetensors").exists()
    ]
    if max_groups is not None:
        todo = todo[:max_groups]
    done = len(plan) - len(todo)
    for s in todo:
        build_group(s, cache_dir)
        done += 1
        if progress:
            progress(done, len(plan))
    return plan
