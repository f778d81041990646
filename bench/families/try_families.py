"""Try the command line end to end on the model families users bring, as a new user would.

Rebuilds tiny models of each family (``transformers`` configs saved by ``save_pretrained``,
a BatchNorm CNN through ``--arch file.py:fn``, a peft LoRA adapter), then runs every
command in a fresh process per family through the CLI app with the progress recorder:
wall time, the report's own stage timings, the recorded progress phases, the time no phase
covers, the choices the footer states (loss, label shift, mode, dtype) and the model's own
``outputs.loss`` beside gmcurv's mean loss (float64).

    nice -n 10 python bench/families/try_families.py          # writes results.json here

Absolute times are noise under load (``uptime`` is recorded); look at the shares.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCAB, T, N = 64, 16, 16
CAUSAL = ("llama", "qwen2", "mistral", "opt", "gpt2")
FAMILIES = (*CAUSAL, "bert-mlm", "bert-cls", "vit", "cnn-bn", "llama-lora")

CNN_FILE = '''"""A tiny conv net with BatchNorm and a residual add (no torchvision)."""
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(h + self.bn2(self.conv2(h)))
        return self.head(h.mean((2, 3)))


def build():
    return Net()
'''


# ----------------------------------------------------------------------------- building
def _hf_model(family: str):
    import torch
    import transformers as tf

    small = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2}
    heads = {"num_attention_heads": 4, "max_position_embeddings": 64}
    dec = {**small, **heads, "intermediate_size": 64, "num_key_value_heads": 2}
    make = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**dec)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**dec)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**dec, head_dim=8)),
        "opt": lambda: tf.OPTForCausalLM(
            tf.OPTConfig(
                **small,
                **heads,
                ffn_dim=64,
                word_embed_proj_dim=32,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=1,
            )
        ),
        "gpt2": lambda: tf.GPT2LMHeadModel(
            tf.GPT2Config(
                vocab_size=VOCAB,
                n_positions=64,
                n_embd=32,
                n_layer=2,
                n_head=4,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        "bert-mlm": lambda: tf.BertForMaskedLM(
            tf.BertConfig(**small, **heads, intermediate_size=64)
        ),
        "bert-cls": lambda: tf.BertForSequenceClassification(
            tf.BertConfig(**small, **heads, intermediate_size=64, num_labels=3)
        ),
        "vit": lambda: tf.ViTForImageClassification(
            tf.ViTConfig(
                image_size=16,
                patch_size=4,
                num_channels=3,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_labels=5,
            )
        ),
    }
    torch.manual_seed(0)
    with contextlib.redirect_stderr(io.StringIO()):
        return make[family]().eval()


def _data(family: str) -> dict:
    import torch

    g = torch.Generator().manual_seed(1)
    if family == "vit":
        return {
            "pixel_values": torch.randn(N, 3, 16, 16, generator=g),
            "labels": torch.randint(0, 5, (N,), generator=g),
        }
    if family == "cnn-bn":
        return {
            "inputs": torch.randn(N, 3, 8, 8, generator=g),
            "targets": torch.randint(0, 4, (N,), generator=g),
        }
    ids = torch.randint(2, VOCAB, (N, T), generator=g)
    mask = torch.ones_like(ids)
    if family == "bert-cls":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (N,))}
    if family == "bert-mlm":  # 15 % of tokens masked, the rest -100 (the library's collator)
        chosen = torch.rand(N, T, generator=g) < 0.15
        chosen[:, 0] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        return {"input_ids": torch.where(chosen, 3, ids), "attention_mask": mask, "labels": labels}
    return {"input_ids": ids, "attention_mask": mask}


def build(root: Path) -> dict[str, dict]:
    """Write every family's model and data under `root`; {family: {model, data, extra}}."""
    import torch
    from safetensors.torch import save_file

    out = {}
    for fam in FAMILIES:
        d = root / fam
        d.mkdir(parents=True)
        base = "llama" if fam == "llama-lora" else fam
        data = _data(base)
        save_file({k: v.contiguous() for k, v in data.items()}, str(d / "data.safetensors"))
        entry = {"model": str(d / "model"), "data": str(d / "data.safetensors"), "extra": []}
        if fam == "cnn-bn":
            (d / "cnn.py").write_text(CNN_FILE)
            ns: dict = {}
            exec(compile(CNN_FILE, "cnn.py", "exec"), ns)
            torch.manual_seed(0)
            net = ns["build"]()
            with torch.no_grad():  # non-trivial running statistics
                for bn in (net.bn1, net.bn2):
                    bn.running_mean.uniform_(-0.2, 0.2)
                    bn.running_var.uniform_(0.5, 1.5)
            save_file(net.state_dict(), str(d / "model.safetensors"))
            entry["model"] = str(d / "model.safetensors")
            entry["extra"] = ["--arch", f"{d / 'cnn.py'}:build"]
        else:
            model = _hf_model(base)
            with contextlib.redirect_stderr(io.StringIO()):
                model.save_pretrained(str(d / "model"))
            if fam == "llama-lora":
                import peft

                cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
                pm = peft.get_peft_model(model, cfg)
                torch.manual_seed(2)
                for n, p in pm.named_parameters():
                    if "lora_B" in n:
                        p.data.normal_(0, 0.05)
                pm.save_pretrained(str(d / "adapter"))
                entry["adapter"] = str(d / "adapter")
        out[fam] = entry
    return out


# ------------------------------------------------------------------------------ running
def commands(fam: str, e: dict, tmp: Path) -> list[tuple[str, list[str]]]:
    m, dt, x = e["model"], e["data"], e["extra"]
    if fam == "llama-lora":
        return [
            ("lora adapter", ["lora", e["adapter"], "-o", str(tmp / "lora0.json")]),
            ("lora +model", ["lora", e["adapter"], m, dt, "-o", str(tmp / "lora1.json")]),
        ]
    rep = str(tmp / "trace.json")
    pruned = str(tmp / "pruned.safetensors")
    return [
        ("trace", ["trace", m, dt, *x, "-o", rep]),
        ("trace --json", ["trace", m, dt, *x, "--json"]),
        ("eigen --k 1", ["eigen", m, dt, *x, "--k", "1", "-o", str(tmp / "eigen.json")]),
        (
            "saliency --prune 0.5",
            [
                "saliency",
                m,
                dt,
                *x,
                "--prune",
                "0.5",
                "--save-pruned",
                pruned,
                "-o",
                str(tmp / "sal.json"),
            ],
        ),
        ("trace pruned", ["trace", pruned, dt, *x, "-o", str(tmp / "pruned.json")]),
        (
            "trace --curvature all --probes 10",
            [
                "trace",
                m,
                dt,
                *x,
                "--curvature",
                "all",
                "--probes",
                "10",
                "-o",
                str(tmp / "all.json"),
            ],
        ),
        ("check", ["check", rep, "fisher.trace < 0"]),
    ]


def _own_loss(fam: str, e: dict) -> float | None:
    """The model's own ``outputs.loss`` in float64 (labels = input_ids for causal LMs)."""
    import torch
    from safetensors.torch import load_file

    if fam in ("cnn-bn", "llama-lora"):
        return None
    import transformers as tf

    with contextlib.redirect_stderr(io.StringIO()):
        cfg = tf.AutoConfig.from_pretrained(e["model"])
        cls = getattr(tf, cfg.architectures[0])
        model = cls.from_pretrained(e["model"], attn_implementation="eager").double().eval()
    batch = load_file(e["data"])
    if fam in CAUSAL:
        batch["labels"] = batch["input_ids"]
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].double()
    with torch.no_grad():
        return float(model(**batch).loss)


def child(fam: str, spec: str) -> None:
    """Run one family's commands in this process; print one JSON line."""
    t0 = time.perf_counter()
    from typer.testing import CliRunner

    from gmcurv.cli import progress
    from gmcurv.cli.app import app

    e = json.loads(spec)
    tmp = Path(e["tmp"])
    rows = []
    for name, args in commands(fam, e, tmp):
        with progress.recording() as rec:
            start = time.perf_counter()
            r = CliRunner().invoke(app, args)
            wall = time.perf_counter() - start
        report = None
        out = next((args[i + 1] for i, a in enumerate(args) if a == "-o"), None)
        if name == "trace --json" and r.exit_code == 0:
            report = json.loads(r.stdout)
        elif out and Path(out).exists():
            report = json.loads(Path(out).read_text())
        phases = [
            {
                "label": p.label,
                "total": p.total,
                "done": p.done,
                "advances": p.advances,
                "seconds": round(p.seconds, 3),
                "first_advance": None if p.first_advance is None else round(p.first_advance, 3),
            }
            for p in rec.phases
        ]
        row = {
            "command": name,
            "args": args,
            "exit": r.exit_code,
            "wall": round(wall, 3),
            "phases": phases,
            "in_phases": round(sum(p["seconds"] for p in phases), 3),
            "stderr_tail": r.stderr[-600:] if r.exit_code else "",
            "stdout_tail": r.stdout[-1500:],
        }
        if report:
            cfg = report.get("config", {})
            src = cfg.get("sources", {})
            row["timings"] = report.get("timings")
            row["choices"] = {
                k: [cfg.get(k), src.get(k)] for k in ("loss", "label_shift", "mode", "dtype")
            }
            loss = report.get("results", {}).get("loss")
            row["loss"] = loss.get("value") if isinstance(loss, dict) else None
            row["warnings"] = report.get("warnings")
        if r.exception and not isinstance(r.exception, SystemExit):
            row["exception"] = repr(r.exception)
        rows.append(row)
    own = _own_loss(fam, e)
    print(
        json.dumps(
            {
                "family": fam,
                "rows": rows,
                "own_loss": own,
                "process": round(time.perf_counter() - t0, 2),
            }
        )
    )


def run_child(script: str, fam: str, entry: dict, root: Path) -> dict:
    """Run `script --child fam SPEC` in its own process (SPEC = `entry` plus an empty output
    dir): the child's last JSON line, its whole-process wall time and, on failure, stderr."""
    tmp = root / fam / "out"
    tmp.mkdir()
    spec = json.dumps({**entry, "tmp": str(tmp)})
    start = time.perf_counter()
    p = subprocess.run(
        [sys.executable, script, "--child", fam, spec], capture_output=True, text=True, cwd=root
    )
    line = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "{}"
    res = json.loads(line) if line.startswith("{") else {"raw": p.stdout[-2000:]}
    res["process_wall"] = round(time.perf_counter() - start, 2)
    if p.returncode:
        res["child_stderr"] = p.stderr[-3000:]
    return res


def main() -> None:
    os.environ.setdefault("GMCURV_NO_CONFIG", "1")
    only = sys.argv[1:]
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results = {"uptime_start": up, "families": {}}
    with tempfile.TemporaryDirectory(prefix="gmcurv-families-") as root:
        t0 = time.perf_counter()
        built = build(Path(root))
        results["build_seconds"] = round(time.perf_counter() - t0, 2)
        for fam, e in built.items():
            if only and fam not in only:
                continue
            res = run_child(__file__, fam, e, Path(root))
            results["families"][fam] = res
            print(f"{fam}: {res['process_wall']} s", file=sys.stderr)
            (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    results["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    summarise(results)


def summarise(results: dict) -> None:
    """One line per command: exit, wall, phases, uncovered time, loss vs outputs.loss."""
    for fam, res in results["families"].items():
        own = res.get("own_loss")
        for r in res.get("rows", []):
            ph = ", ".join(
                f"{p['label']} {p['seconds']}s {p['done']}/{p['total']}" for p in r["phases"]
            )
            loss = r.get("loss")
            cmp = "" if own is None or loss is None else f" loss {loss:.6g} own {own:.6g}"
            print(
                f"{fam:10s} {r['command']:22s} exit {r['exit']} wall {r['wall']:6.2f}s "
                f"uncovered {r['wall'] - r['in_phases']:5.2f}s timings {r.get('timings')}"
                f"{cmp} | {ph}"
            )
            if r["exit"] not in (0, 1) or "exception" in r:
                print("   !!", r.get("exception"), r["stderr_tail"][-300:])
        if "child_stderr" in res:
            print("   child stderr:", res["child_stderr"][-1000:])


def markdown(results: dict) -> str:
    """The findings table: one row per command (wall, stage timings, bars, loss check)."""
    lines = [
        f"uptime at start: `{results['uptime_start']}`; models built in "
        f"{results.get('build_seconds')} s",
        "",
        "| family | command | exit | wall s | report timings (s) | phases > 1 s without a count "
        "| loss / outputs.loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for fam, res in results["families"].items():
        own = res.get("own_loss")
        for r in res.get("rows", []):
            t = r.get("timings") or {}
            timings = ", ".join(f"{k} {v:.2f}" for k, v in t.items())
            stuck = [
                f"{p['label']} ({p['seconds']:.1f} s)"
                for p in r["phases"]
                if p["seconds"] > 1 and (p["total"] is None or p["done"] == 0)
            ]
            loss = r.get("loss") if r["command"] != "trace pruned" else None
            cmp = "" if own is None or loss is None else f"{loss / own:.6f}"
            lines.append(
                f"| {fam} | `{r['command']}` | {r['exit']} | {r['wall']:.1f} | {timings} | "
                f"{'; '.join(stuck)} | {cmp} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "--summary":
        summarise(json.loads((HERE / "results.json").read_text()))
    elif len(sys.argv) > 1 and sys.argv[1] == "--markdown":
        print(markdown(json.loads((HERE / "results.json").read_text())))
    else:
        main()
