"""The commands beyond ``trace`` on the families users bring, as a new user runs them.

Reuses `try_families.build` (tiny ``save_pretrained`` models, nothing downloaded) and adds
what users have: a bfloat16 copy, a sharded copy, a ``pytorch_model.bin``-only directory,
an ``auto_map`` config, text data, and peft adapters (ranks, rsLoRA, rank patterns, DoRA,
``modules_to_save``, a base model named by a hub id). Each family runs in one fresh process
through the CLI app: ``saliency --prune 0.5`` with the default output (for a directory, the
directory ``<dir>.pruned-50``), then ``transformers``' ``from_pretrained`` on it (keys,
dtypes, tied weights, and its ``outputs.loss`` against the "after" loss gmcurv reports),
``saliency --plot`` (the sweep), ``eigen --plot``, ``spectrum --plot`` and ``landscape --plot``.

    nice -n 10 python bench/families/try_commands.py [FAMILY...]   # writes commands.json
    python bench/families/try_commands.py --markdown                # the RESULTS.md table

Absolute times are noise under load (``uptime`` is recorded).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from try_families import CAUSAL, build, run_child  # noqa: E402

FAMILIES = ("llama", "qwen2", "opt", "bert-cls", "bert-mlm", "vit")
OUT = HERE / "commands.json"


def commands(fam: str, model: str, data: str, tmp: Path) -> list[tuple[str, list[str]]]:
    """What a user runs after ``trace`` (short settings: tiny models, a loaded machine)."""
    return [
        ("saliency --prune 0.5", ["saliency", model, data, "--prune", "0.5", "--json"]),
        ("saliency --plot", ["saliency", model, data, "--plot", str(tmp / "sal.png"), "--json"]),
        ("eigen --k 2 --plot", ["eigen", model, data, "--k", "2", "--plot", str(tmp / "e.png")]),
        (
            "spectrum --probes 1 --steps 20",
            [
                "spectrum",
                model,
                data,
                "--probes",
                "1",
                "--steps",
                "20",
                "--plot",
                str(tmp / "s.svg"),
            ],
        ),
        (
            "landscape --steps 5",
            ["landscape", model, data, "--steps", "5", "--plot", str(tmp / "l.png")],
        ),
    ]


def reload_check(fam: str, model_dir: Path, pruned_dir: Path, data: Path, after: float) -> dict:
    """``from_pretrained`` on the pruned directory: keys and dtypes as the input, tied weights
    tied, weights equal the file, and the library's loss equal to gmcurv's "after" loss."""
    import torch
    import transformers as tf
    from safetensors import safe_open
    from safetensors.torch import load_file

    def dtypes(path: Path) -> dict[str, str]:
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
            return {k: f.get_slice(k).get_dtype() for k in names}

    with contextlib.redirect_stderr(io.StringIO()):
        cls = getattr(tf, tf.AutoConfig.from_pretrained(str(model_dir)).architectures[0])
        model = cls.from_pretrained(str(pruned_dir), attn_implementation="eager").eval()
    file = load_file(str(pruned_dir / "model.safetensors"))
    state = model.state_dict()
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    batch = load_file(str(data))
    if fam in CAUSAL:
        batch["labels"] = batch["input_ids"]
    with torch.no_grad():
        loss = float(
            model.double()(
                **{k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
            ).loss
        )
    return {
        "keys_dtypes_equal": dtypes(pruned_dir / "model.safetensors")
        == dtypes(model_dir / "model.safetensors"),
        "weights_equal_file": all(torch.equal(state[k], v) for k, v in file.items() if k in state),
        "tied": None if out_emb is None else out_emb.weight is in_emb.weight,
        "config_tie": getattr(model.config, "tie_word_embeddings", None),
        "loss_hf": loss,
        "loss_gmcurv_after": after,
        "loss_rel_diff": abs(loss - after) / abs(loss),
    }


def child(fam: str, spec: str) -> None:
    """Run one family's commands in this process; print one JSON line."""
    from typer.testing import CliRunner

    from gmcurv.cli.app import app

    e = json.loads(spec)
    tmp = Path(e["tmp"])
    rows = []
    for name, args in commands(fam, e["model"], e["data"], tmp):
        start = time.perf_counter()
        r = CliRunner().invoke(app, args)
        row = {"command": name, "exit": r.exit_code, "wall": round(time.perf_counter() - start, 2)}
        if r.exit_code:
            row["stderr_tail"] = r.stderr[-600:]
        if r.exception and not isinstance(r.exception, SystemExit):
            row["exception"] = repr(r.exception)
        if name == "saliency --prune 0.5" and r.exit_code == 0:
            doc = json.loads(r.stdout)
            p = doc["results"]["prune"]
            row["checkpoint"] = p["checkpoint"]["path"]
            row["timings"] = doc["timings"]
            row["reload"] = reload_check(
                fam,
                Path(e["model"]),
                Path(p["checkpoint"]["path"]).parent,
                Path(e["data"]),
                p["after"]["loss"]["value"],
            )
        if name == "saliency --plot" and r.exit_code == 0:
            sweep = json.loads(r.stdout)["results"].get("sweep", {})
            row["sweep_keys"] = sorted(sweep)[:8]
        rows.append(row)
    print(json.dumps({"family": fam, "rows": rows}))


def inputs_users_have(root: Path, built: dict) -> list[dict]:
    """Refusals and statements on the checkpoints and data users really have (one process)."""
    import torch
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from gmcurv.cli.app import app

    llama = Path(built["llama"]["model"])
    data = built["llama"]["data"]
    cases: list[tuple[str, list[str]]] = []
    # a pytorch_model.bin-only directory (the pickle would write a file if ever loaded)
    binary = root / "llama-bin"
    binary.mkdir()
    (binary / "config.json").write_bytes((llama / "config.json").read_bytes())
    (binary / "pytorch_model.bin").write_bytes(
        pickle.dumps(load_file(str(llama / "model.safetensors")))
    )
    cases.append(("pytorch_model.bin only", ["trace", str(binary), data]))
    # auto_map: remote code is never run
    remote = root / "llama-remote"
    remote.mkdir()
    cfg = json.loads((llama / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (remote / "config.json").write_text(json.dumps(cfg))
    (remote / "model.safetensors").write_bytes((llama / "model.safetensors").read_bytes())
    (remote / "modeling_x.py").write_text(f"open({str(root / 'RAN')!r}, 'w')\n")
    cases.append(("config with auto_map", ["trace", str(remote), data]))
    # bfloat16 weights, sharded weights
    import transformers as tf

    with contextlib.redirect_stderr(io.StringIO()):
        m = tf.LlamaForCausalLM.from_pretrained(str(llama))
        m.to(torch.bfloat16).save_pretrained(str(root / "llama-bf16"))
        m.float().save_pretrained(str(root / "llama-sharded"), max_shard_size="60KB")
    cases.append(("bfloat16 weights", ["trace", str(root / "llama-bf16"), data, "--k", "0"]))
    cases.append(
        (
            "sharded index",
            [
                "saliency",
                str(root / "llama-sharded"),
                data,
                "--prune",
                "0.5",
                "--criterion",
                "magnitude",
            ],
        )
    )
    # data as users have it
    (root / "text.jsonl").write_text('{"text": "hello"}\n')
    cases.append(("text data (.jsonl)", ["trace", str(llama), str(root / "text.jsonl")]))
    ids = load_file(data)["input_ids"]
    mask = torch.ones_like(ids)
    mask[::2, -5:] = 0
    save_file({"input_ids": ids * mask, "attention_mask": mask}, str(root / "padded.safetensors"))
    cases.append(
        (
            "right padding + mask",
            ["trace", str(llama), str(root / "padded.safetensors"), "--k", "0"],
        )
    )
    rows = []
    for name, args in cases:
        start = time.perf_counter()
        r = CliRunner().invoke(app, args)
        rows.append(
            {
                "case": name,
                "exit": r.exit_code,
                "wall": round(time.perf_counter() - start, 2),
                "message": (r.stderr or "")[-400:]
                if r.exit_code
                else " ".join(r.stdout.split()[-60:]),
            }
        )
    rows.append(
        {"case": "auto_map code ran", "exit": None, "message": str((root / "RAN").exists())}
    )
    return rows


def main() -> None:
    os.environ.setdefault("GMCURV_NO_CONFIG", "1")
    only = sys.argv[1:]
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results: dict = {"uptime_start": up, "families": {}}
    with tempfile.TemporaryDirectory(prefix="gmcurv-commands-") as root:
        built = build(Path(root))
        for fam in FAMILIES:
            if only and fam not in only:
                continue
            res = run_child(__file__, fam, built[fam], Path(root))
            results["families"][fam] = res
            print(f"{fam}: {res['process_wall']} s", file=sys.stderr)
            OUT.write_text(json.dumps(results, indent=1) + "\n")
        if not only or "inputs" in only:
            results["inputs"] = inputs_users_have(Path(root), built)
    results["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))


def markdown(results: dict) -> str:
    """Command x family: exit, wall, and for --prune the from_pretrained reload check."""
    lines = [f"uptime at start: `{results['uptime_start']}`", ""]
    lines += ["| family | command | exit | wall s | notes |", "|---|---|---|---|---|"]
    for fam, res in results["families"].items():
        for r in res.get("rows", []):
            note = r.get("exception") or r.get("stderr_tail", "").strip().replace("\n", " ")[:120]
            if "reload" in r:
                rl = r["reload"]
                note = (
                    f"from_pretrained: keys/dtypes {'=' if rl['keys_dtypes_equal'] else '≠'}, "
                    f"tied {rl['tied']}, loss rel. diff {rl['loss_rel_diff']:.1e}"
                )
            lines.append(f"| {fam} | `{r['command']}` | {r['exit']} | {r['wall']:.1f} | {note} |")
    for r in results.get("inputs", []):
        msg = r["message"].strip().replace("\n", " ").replace("|", "\\|")[:160]
        lines.append(f"| inputs | {r['case']} | {r['exit']} | {r.get('wall', '')} | {msg} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "--markdown":
        print(markdown(json.loads(OUT.read_text())))
    else:
        main()
