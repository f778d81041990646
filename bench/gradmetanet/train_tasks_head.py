"""Head v1.1: fine-tune the shipped head v1 on the ``tasks`` zoo (more task diversity).

Training models: the ``tasks`` zoo's split ``train`` (the v1 training datasets on every
training architecture, and procedural task instances: Gaussian mixtures, random teachers,
parity, with random input scales and label noise) plus the ``default`` (v1) zoo's split
``val`` (new seeds of v1's training combinations, with OBS and λ_max targets). Model
selection: the ``tasks`` zoo's ``val`` (unseen task instances), Fisher-diagonal NMAE; the
starting head counts as epoch -1, so the result is never worse there. Held-out tasks
(``test-task``), ``digits`` and the unseen architectures are never read.

The ``tasks`` zoo is built in the background and resumes across sessions, so the training
set is "the first ``--train-groups`` training groups of the plan" (default: every built one);
the count is recorded in the head's metadata.

Run::

    python bench/gradmetanet/train_tasks_head.py --tasks-zoo DIR --v1-zoo DIR --save FILE
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from gmcurv.gradmetanet.head import head_metadata  # noqa: E402
from gmcurv.gradmetanet.model import HeadConfig, widen_edges  # noqa: E402
from gmcurv.gradmetanet.pretrained import load_head, save_head  # noqa: E402
from gmcurv.gradmetanet.provenance import supported_models, training_record  # noqa: E402
from gmcurv.gradmetanet.train import TrainConfig, load_items, make_item, train_head  # noqa: E402
from gmcurv.gradmetanet.zoo import read_group, read_plan  # noqa: E402


def built_train_groups(cache_dir: Path, limit: int | None) -> list[Path]:
    """The built ``train`` groups of the tasks zoo, in plan order: the first `limit` of the
    plan (all of them must be built), or every built one."""
    plan = [g for g in read_plan(cache_dir)["groups"] if g["split"] == "train"]
    paths = [cache_dir / "groups" / f"{g['gid']}.safetensors" for g in plan]
    if limit is None:
        return [p for p in paths if p.exists()]
    missing = [p.name for p in paths[:limit] if not p.exists()]
    if missing:
        sys.exit(f"--train-groups {limit}: {len(missing)} of the first {limit} are not built "
                 f"(e.g. {missing[0]}); build more with gmcurv head zoo --size tasks")  # fmt: skip
    return paths[:limit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks-zoo", type=Path, required=True)
    ap.add_argument("--v1-zoo", type=Path, default=None)
    ap.add_argument("--init", type=Path, default=None, help="starting head (default: shipped)")
    ap.add_argument("--save", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--edge-extra", type=int, default=0, help="2: + sampling-error features")
    ap.add_argument("--train-groups", type=int, default=None, help="first N train groups")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = load_head(args.init)
    t0 = time.perf_counter()
    groups = built_train_groups(args.tasks_zoo, args.train_groups)
    train = [make_item(zm) for path in groups for zm in read_group(path)]
    n_tasks = len(train)
    if args.v1_zoo is not None:
        train += load_items(args.v1_zoo, ["val"])
    val = load_items(args.tasks_zoo, ["val"])
    print(f"loaded {n_tasks} + {len(train) - n_tasks} training, {len(val)} val models "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, warmup_steps=20)
    head_cfg = HeadConfig(**{**start.meta["config"], "edge_extra": args.edge_extra})

    def prog(e: dict) -> None:
        if e["event"] == "epoch":
            print(
                f"epoch {e['epoch']} step {e['step']} {e['seconds']:.0f}s val fisher_diag "
                f"{e.get('head.fisher_diag.nmae', float('nan')):.4f} (plug-in "
                f"{e.get('plug.fisher_diag.nmae', float('nan')):.4f})",
                flush=True,
            )

    init = widen_edges(
        {k: v.detach().clone() for k, v in start.model.state_dict().items()}, args.edge_extra
    )
    res = train_head(train, val, head_cfg, cfg, args.checkpoint, prog, None, init)
    print("best epoch", res.best_epoch, res.val_metrics.get("head.fisher_diag.nmae"), flush=True)
    plan = read_plan(args.tasks_zoo)
    command = " ".join(
        ["python bench/gradmetanet/train_tasks_head.py", "--tasks-zoo DIR"]
        + (["--v1-zoo DIR"] if args.v1_zoo is not None else [])
        + [f"--epochs {args.epochs}", f"--lr {args.lr:g}", f"--seed {args.seed}"]
        + [f"--edge-extra {args.edge_extra}", f"--train-groups {len(groups)}", "--save FILE"]
    )
    commands = [
        "gmcurv head zoo --size tasks --seed 0",
        "gmcurv head zoo --size default --seed 0 (split val)",
        "gmcurv head train (head v1, the starting weights)",
        command,
    ]
    training = training_record(
        plan, train_models=len(train), val_models=len(val), config=cfg.to_dict(),
        commands=commands, result=res,
    )  # fmt: skip
    training["init"] = {"version": start.version, "training": start.meta.get("training", {})}
    training["zoo"]["v1_val_models"] = len(train) - n_tasks
    training["zoo"]["tasks_train_groups"] = len(groups)
    used = {path.stem for path in groups}
    training["zoo"]["datasets"] = sorted(
        {g["dataset"] for g in plan["groups"] if g["gid"] in used}
        | (set(start.meta["training"]["zoo"].get("datasets", [])) if args.v1_zoo else set())
    )
    supported = supported_models(plan)
    old = start.supported
    supported["trained_widths"] = sorted(
        set(supported["trained_widths"]) | set(old.get("trained_widths", []))
    )
    meta = head_metadata(head_cfg, training, supported, {}, version="1.1")
    save_head(args.save, res.model, meta)
    print("saved", args.save, f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
