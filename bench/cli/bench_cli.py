"""Whole ``gmcurv`` commands against the peers' equivalent scripts, as a user runs them.

Every command runs in its own process (``python -m gmcurv ... -q -o report.json``): its
wall time (start-up + load + compute) and the report's own stage timings are recorded;
each peer task runs as its own process too (`peers.py`: same weights and data, torch's
lazy imports paid as start-up on both sides, compute timed once, cold). Rounds are
interleaved (gmcurv, peer, gmcurv, peer ...) and the minimum over rounds is kept, so
load on the shared machine hits both sides alike; ``uptime`` load is recorded.

Writes ``bench/cli/results.json`` and ``bench/cli/RESULTS.md``, and regenerates the
timing paragraphs of the README between ``<!-- bench/cli -->`` markers.

Run: ``flock /tmp/gmcurv-bench.lock python bench/cli/bench_cli.py [--repeats 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "distributed"))

from bench_distributed import write_workload  # noqa: E402

SETUP = ("startup", "load", "validate")
HESSIAN100 = ["trace", "--curvature", "hessian", "--method", "hutchinson", "--probes", "100"]
HESSIAN100 += ["--tol", "0", "--k", "0", "--no-per-layer"]
ENV = {**os.environ, "GMCURV_NO_CONFIG": "1", "PYTHONPATH": str(ROOT)}


def load_average() -> list[float]:
    return [float(x) for x in os.getloadavg()]


def run_gmcurv(args: list[str], tmp: Path, env: dict[str, str] = ENV) -> dict:
    """One command in its own process (environment `env`): wall time and the report's
    timings/results."""
    out = tmp / "report.json"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "gmcurv", *args, "-q", "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        where = env.get("PYTHONPATH", "")
        raise SystemExit(f"{where}: gmcurv {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    doc = json.loads(out.read_text())
    timings = doc["timings"]
    compute = sum(v for k, v in timings.items() if k not in SETUP)
    return {"wall": wall, "compute": compute, "timings": timings, "results": doc["results"]}


def run_plain(args: list[str], tmp: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "gmcurv", *args], capture_output=True, env=ENV, cwd=tmp, check=True
    )
    return time.perf_counter() - t0


STARTUP = {"--help": ["--help"], "trace --help": ["trace", "--help"]}


def measure_startup(tmp: Path, repeats: int) -> dict:
    """Wall time of the help screens, each the minimum of `repeats` runs (interleaved),
    with the load average before and after: start-up is short, so a few runs find a quiet
    moment even on a shared machine."""
    before = load_average()
    wall: dict[str, list[float]] = {k: [] for k in STARTUP}
    for _ in range(repeats):
        for name, args in STARTUP.items():
            wall[name].append(run_plain(args, tmp))
    return {"wall": wall, "repeats": repeats, "load_before": before, "load_after": load_average()}


def run_peer(task: str, workload: str, tmp: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(HERE / "peers.py"), task, workload],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:200]}
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**doc, "wall": wall}


def _best(runs: list[dict], key: str) -> dict:
    ok = [r for r in runs if key in r]
    return min(ok, key=lambda r: r[key]) if ok else runs[0]


def cases(paths: dict[str, tuple[Path, Path, list[str]]]) -> list[dict]:
    """What is timed: (id, gmcurv arguments, peer task or None)."""
    out = []
    for w, (model, data, extra) in paths.items():
        base = [str(model), str(data), *extra]
        out += [
            {
                "id": f"{w} fisher",
                "workload": w,
                "what": "empirical Fisher trace (`trace --no-per-layer --k 0`)",
                "args": ["trace", *base, "--no-per-layer", "--k", "0"],
                "peer": "fisher",
            },
            {
                "id": f"{w} default",
                "workload": w,
                "what": "default `gmcurv trace` (per layer, top-5 eigenvalues)",
                "args": ["trace", *base],
                "peer": None,
            },
            {
                "id": f"{w} trace-per-layer",
                "workload": w,
                "what": "Fisher trace per layer, no eigenvalues (`trace --k 0`)",
                "args": ["trace", *base, "--k", "0"],
                "peer": None,
            },
            {
                "id": f"{w} hessian100",
                "workload": w,
                "what": "Hessian trace, 100 Hutchinson probes (`--tol 0`)",
                "args": [*HESSIAN100, *base],
                "peer": "hessian100",
            },
            {
                "id": f"{w} hessian",
                "workload": w,
                "what": "Hessian trace, default (auto, to 1 % s.e.)",
                "args": ["trace", *base, "--curvature", "hessian", "--k", "0", "--no-per-layer"],
                "peer": None,
            },
        ]
        if w != "W3":  # BackPACK has no DiagGGNExact for Embedding / LayerNorm / attention
            out.append(
                {
                    "id": f"{w} ggn",
                    "workload": w,
                    "what": "exact GGN trace (`--curvature ggn --k 0 --no-per-layer`)",
                    "args": ["trace", *base, "--curvature", "ggn", "--k", "0", "--no-per-layer"],
                    "peer": "ggn",
                }
            )
    out += [
        {
            "id": "sample default",
            "workload": "digits_mlp",
            "what": "default `gmcurv trace` on the bundled sample",
            "args": ["trace"],
            "peer": None,
        },
        {
            "id": "tiny_gpt all",
            "workload": "tiny_gpt",
            "what": "`trace --curvature all` (per layer) on the bundled tiny_gpt",
            "args": ["trace", *_tiny_gpt(), "--curvature", "all"],
            "peer": None,
        },
        {
            "id": "tiny_gpt all flat",
            "workload": "tiny_gpt",
            "what": "`trace --curvature all --no-per-layer` on the bundled tiny_gpt",
            "args": ["trace", *_tiny_gpt(), "--curvature", "all", "--no-per-layer"],
            "peer": None,
        },
    ]
    # the README's cases first, the 100-probe Hessian traces (slowest, with their peer) last:
    # under a time budget (--max-minutes) what is left out is the least needed
    order = ["sample", "tiny_gpt", "fisher", "ggn", "default", "trace-per-layer", "hessian"]
    order.append("hessian100")
    return sorted(out, key=lambda c: order.index(c["id"].split()[c["id"].startswith("W")]))


def _tiny_gpt() -> list[str]:
    root = ROOT / "sample_models" / "tiny_gpt"
    return [str(root), str(root / "data")]


def products(results: dict) -> int:
    return sum(int(results.get(k, {}).get("n_matvecs") or 0) for k in ("ggn", "hessian"))


def products_by_kind(results: dict) -> dict[str, int]:
    return {k: int(results[k].get("n_matvecs") or 0) for k in ("ggn", "hessian") if k in results}


def _products(row: dict) -> str:
    parts = row.get("products_by_kind") or {}
    split = " + ".join(f"{v} {'GGN' if k == 'ggn' else 'Hessian'}" for k, v in parts.items())
    return f"{row['products']} products" + (f": {split}" if len(parts) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", default=None, help="regex on case ids")
    ap.add_argument("--render", action="store_true", help="only re-render from results.json")
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="time budget: a case's next round is skipped when its last one would not fit",
    )
    ap.add_argument("--startup-repeats", type=int, default=10, help="runs of each --help")
    args = ap.parse_args()
    if args.render:
        doc = json.loads((HERE / "results.json").read_text())
        (HERE / "RESULTS.md").write_text(markdown(doc))
        readme(doc)
        return
    tmp = Path(tempfile.mkdtemp(prefix="gmcurv-bench-cli-"))
    paths = {w: write_workload(w, tmp) for w in ("W1", "W2", "W3")}
    todo = [c for c in cases(paths) if args.only is None or re.search(args.only, c["id"])]
    load_before = load_average()
    runs: dict[str, dict[str, list]] = {c["id"]: {"gmcurv": [], "peer": []} for c in todo}
    startup = measure_startup(tmp, args.startup_repeats)
    t_start = time.perf_counter()
    budget = args.max_minutes * 60 if args.max_minutes else None
    took: dict[str, float] = {}  # one round of a case (gmcurv + peer), seconds
    skipped: list[str] = []
    for r in range(args.repeats):
        for c in todo:
            left = budget - (time.perf_counter() - t_start) if budget else None
            if left is not None and (took.get(c["id"], 0.0) > left or left <= 0):
                skipped.append(f"{c['id']} (round {r + 1})")
                continue
            print(f"round {r + 1}: {c['id']}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            runs[c["id"]]["gmcurv"].append(run_gmcurv(c["args"], tmp))
            if c["peer"]:
                runs[c["id"]]["peer"].append(run_peer(c["peer"], c["workload"], tmp))
            took[c["id"]] = time.perf_counter() - t0
    rows = []
    for c in todo:
        if not runs[c["id"]]["gmcurv"]:
            continue
        g = _best(runs[c["id"]]["gmcurv"], "compute")
        row = {
            "id": c["id"],
            "workload": c["workload"],
            "what": c["what"],
            "command": "gmcurv " + " ".join(Path(a).name if "/" in a else a for a in c["args"]),
            "gmcurv_compute": g["compute"],
            "gmcurv_wall": min(x["wall"] for x in runs[c["id"]]["gmcurv"]),
            "gmcurv_timings": g["timings"],
            "rounds": len(runs[c["id"]]["gmcurv"]),
            "products": products(g["results"]),
            "products_by_kind": products_by_kind(g["results"]),
            "value": _headline(g["results"]),
            "stopped": {
                k: g["results"][k].get("stopped") for k in ("ggn", "hessian") if k in g["results"]
            },
        }
        if c["peer"]:
            p = _best(runs[c["id"]]["peer"], "compute")
            row["peer"] = p.get("peer")
            if "compute" in p:
                row.update(
                    peer_compute=p["compute"],
                    peer_wall=min(x["wall"] for x in runs[c["id"]]["peer"] if "wall" in x),
                    peer_value=p["value"],
                    ratio_compute=g["compute"] / p["compute"],
                )
            else:
                row["peer_error"] = p.get("error")
        rows.append(row)
    doc = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": load_average(),
            "repeats": args.repeats,
            "only": args.only,
            "commit": _commit(),
            "skipped": skipped,
            "torch_threads_env": os.environ.get("OMP_NUM_THREADS"),
        },
        "startup_wall": {k: min(v) for k, v in startup["wall"].items() if v},
        "startup": startup,
        "rows": rows,
    }
    (HERE / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (HERE / "RESULTS.md").write_text(markdown(doc))
    readme(doc)
    print(markdown(doc))


def _headline(results: dict) -> float | None:
    for k in ("hessian", "ggn", "fisher"):
        if results.get(k):
            return results[k]["trace"]["value"]
    return None


def _ratio(row: dict, key: str) -> dict | None:
    return next((r for r in row if r["id"] == key), None)


def targets(doc: dict) -> list[tuple[str, str, str]]:
    """(target, measured, met/missed) for the issue-13 targets this benchmark covers."""
    by = {r["id"]: r for r in doc["rows"]}
    out = []
    for w in ("W1", "W2", "W3"):
        f = by.get(f"{w} fisher")
        if f and "peer_compute" in f:
            x = f["gmcurv_compute"] / f["peer_compute"]
            out.append(
                (
                    f"{w} Fisher trace (`--k 0`) within 1.5x of {f['peer']}",
                    f"{f['gmcurv_compute'] * 1e3:.0f} ms vs {f['peer_compute'] * 1e3:.0f} ms "
                    f"({x:.2f}x)",
                    "met" if x <= 1.5 else "missed",
                )
            )
        gg = by.get(f"{w} ggn")
        if gg and "peer_compute" in gg:
            x = gg["gmcurv_compute"] / gg["peer_compute"]
            out.append(
                (
                    f"{w} exact GGN trace at or below BackPACK DiagGGNExact",
                    f"{gg['gmcurv_compute'] * 1e3:.0f} ms vs {gg['peer_compute'] * 1e3:.0f} ms "
                    f"({x:.2f}x)",
                    "met" if x <= 1.0 else "missed",
                )
            )
        d, t = by.get(f"{w} default"), by.get(f"{w} trace-per-layer")
        if d and t:
            x = d["gmcurv_compute"] / t["gmcurv_compute"]
            out.append(
                (
                    f"{w} default `trace` (top-5) within 3x of the trace alone",
                    f"{d['gmcurv_compute'] * 1e3:.0f} ms vs {t['gmcurv_compute'] * 1e3:.0f} ms "
                    f"({x:.2f}x)",
                    "met" if x <= 3 else "missed",
                )
            )
        h = by.get(f"{w} hessian100")
        if h and "peer_compute" in h:
            x = h["gmcurv_compute"] / h["peer_compute"]
            out.append(
                (
                    f"{w} per HVP at most PyHessian's (100-probe trace)",
                    f"{h['gmcurv_compute'] * 10:.1f} ms vs {h['peer_compute'] * 10:.1f} ms "
                    f"per product ({x:.2f}x)",
                    "met" if x <= 1.0 else "missed",
                )
            )
    a, b = by.get("tiny_gpt all"), by.get("tiny_gpt all flat")
    if a:
        out.append(
            (
                "tiny_gpt `trace --curvature all` <= 60 s",
                f"{a['gmcurv_compute']:.1f} s compute, {a['gmcurv_wall']:.1f} s wall",
                "met" if a["gmcurv_wall"] <= 60 else "missed",
            )
        )
    if a and b:
        pa, pb = a["products"], b["products"]
        out.append(
            (
                "tiny_gpt per layer <= 2x the products of --no-per-layer",
                f"{pa} vs {pb} products",
                "met" if pa <= 2 * max(pb, 1) else "missed",
            )
        )
    hs = doc["startup_wall"].get("--help")
    if hs is not None:
        out.append(("`gmcurv --help` < 0.5 s wall", f"{hs:.2f} s", "met" if hs < 0.5 else "missed"))
    return out


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        "# Whole commands: gmcurv vs the peers' scripts (issue 13)",
        "",
        "Generated by `bench/cli/bench_cli.py`; do not edit. Each command and each peer "
        "script runs in its own process; compute = the report's own stage timings (gmcurv) "
        "or the timed call (peer), start-up (imports, torch's lazy imports) excluded on both "
        "sides; wall = the whole process. Minimum over interleaved rounds. "
        f"{m['cpus']} shared CPU cores, load average {m['load_before'][0]:.1f} before and "
        f"{m['load_after'][0]:.1f} after (other jobs ran: read ratios, not absolute times)"
        + (f"; commit {m['commit']}." if m.get("commit") else "."),
        "",
        *_coverage(m),
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {v} | {ok} |" for t, v, ok in targets(doc)]
    lines += [
        "",
        "## Every command",
        "",
        "| case | command | gmcurv compute (s) | wall (s) | rounds | products | value | peer | "
        "peer compute (s) | peer wall (s) | gmcurv / peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        peer = r.get("peer") or "—"
        pc = f"{r['peer_compute']:.3f}" if "peer_compute" in r else r.get("peer_error", "—")
        pw = f"{r['peer_wall']:.2f}" if "peer_wall" in r else "—"
        ratio = f"{r['ratio_compute']:.2f}x" if "ratio_compute" in r else "—"
        value = f"{r['value']:.6g}" if r["value"] is not None else "—"
        lines.append(
            f"| {r['id']} | `{r['command']}` | {r['gmcurv_compute']:.3f} | "
            f"{r['gmcurv_wall']:.2f} | {r.get('rounds', '—')} | {r['products']} | {value} | "
            f"{peer} | {pc} | {pw} | "
            f"{ratio} |"
        )
    s = doc["startup_wall"]
    st = doc.get("startup", {})
    how = (
        f"minimum of {st['repeats']} runs, load average {st['load_before'][0]:.1f} before and "
        f"{st['load_after'][0]:.1f} after"
        if st
        else "minimum over the rounds"
    )
    lines += [
        "",
        f"Start-up: `gmcurv --help` {s.get('--help', float('nan')):.2f} s, "
        f"`gmcurv trace --help` {s.get('trace --help', float('nan')):.2f} s wall ({how}; "
        "the help screens import neither torch nor matplotlib, `tests/test_startup.py`).",
        "",
    ]
    return "\n".join(lines)


def _commit() -> str | None:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    )
    return out.stdout.strip() or None


def _coverage(m: dict) -> list[str]:
    """Lines saying which cases this run left out (``--only``, the time budget)."""
    out = []
    if m.get("only"):
        out.append(f"Subset: only the cases matching `{m['only']}` were run.")
    if m.get("skipped"):
        out.append(
            "Left out for the time budget (`--max-minutes`): " + ", ".join(m["skipped"]) + "."
        )
    return [" ".join(out), ""] if out else []


def readme(doc: dict) -> None:
    """Regenerate the README's timing paragraph between the bench/cli markers."""
    path = ROOT / "README.md"
    text = path.read_text()
    start, end = "<!-- bench/cli -->", "<!-- /bench/cli -->"
    if start not in text or end not in text:
        return
    by = {r["id"]: r for r in doc["rows"]}
    parts = []
    sample = by.get("sample default")
    load = max(doc["machine"]["load_before"][0], doc["machine"]["load_after"][0])
    where = (
        f"on two CPU cores (load average at most {load:.1f} while measured)"
        if load < 2.5
        else f"on two CPU cores shared with other jobs (load average up to {load:.0f} while "
        "measured, so absolute times are pessimistic)"
    )
    if sample:
        parts.append(
            f"On the sample (1,024 digits, 17,226 parameters) the default `gmcurv trace` "
            f"computes for {sample['gmcurv_compute']:.2f} s ({sample['gmcurv_wall']:.1f} s "
            f"for the whole process) {where}: empirical-Fisher trace "
            f"{sample['value']:.4g}, exact top-5 eigenvalues, per-layer traces."
        )
    a, b = by.get("tiny_gpt all"), by.get("tiny_gpt all flat")
    if a and b:
        parts.append(
            f"`trace --curvature all` on the bundled `tiny_gpt` computes for "
            f"{a['gmcurv_compute']:.1f} s ({a['gmcurv_wall']:.0f} s for the whole process; "
            f"{_products(a)}; per-layer traces share the total's products, so "
            f"`--no-per-layer` takes {b['products']}, {b['gmcurv_compute']:.1f} s); "
            "stochastic traces stop at `--tol` (1 % relative standard error) or the "
            "`--probes` cap."
        )
    else:
        parts.append(
            "`trace --curvature all` on the bundled `tiny_gpt` was not timed in the last run "
            "(`bench/cli/RESULTS.md` lists what was)."
        )
    hs = doc["startup_wall"]
    if hs:
        parts.append(
            f"`gmcurv --help` starts in {hs['--help']:.2f} s, `gmcurv trace --help` in "
            f"{hs['trace --help']:.2f} s (best of {doc.get('startup', {}).get('repeats', 2)})."
        )
    parts.append(
        "Timings are regenerated by `bench/cli/bench_cli.py` (whole commands against the "
        "peers' scripts, `bench/cli/RESULTS.md`)."
    )
    block = start + "\n" + _wrap(" ".join(parts)) + "\n" + end
    path.write_text(text[: text.index(start)] + block + text[text.index(end) + len(end) :])


def _wrap(text: str, width: int = 92) -> str:
    out, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*out, line])


if __name__ == "__main__":
    main()
