"""Wall time of whole ``gmcurv`` commands, process start to exit, and where it goes outside
the compute: interpreter start, imports and start-up, load, the compute, rendering and
writing, and the interpreter's exit.

Each command runs in a fresh process, rounds interleaved (the order of commands and
sides alternates between rounds), through a driver that does what ``python -m gmcurv``
does (`runpy.run_module`) and stamps the time when the interpreter is up and when its
last ``atexit`` handler runs. Per run: ``wall`` (spawn to reaped), ``up`` (spawn to the
driver's first line: interpreter start), ``exit`` (last ``atexit`` handler to reaped:
module teardown and the final garbage collection), the peak RSS (``wait4``), and for
commands that write a report its own ``timings`` (``startup`` = torch's lazy imports,
``load``, ``validate``; the rest is compute). ``uptime`` load is recorded every round.

Commands: ``gmcurv --help``, ``gmcurv trace --help``, ``gmcurv check`` (a rule on a small
report), ``gmcurv trace`` on the bundled sample, and the default ``gmcurv trace`` on the
W2 workload (`bench_distributed.write_workload`), each with ``-q -o report.json`` when it
writes a report.

``--baseline-src DIR``: also time another version of gmcurv in the same rounds, for
before/after: ``DIR`` holds its ``gmcurv`` package with ``cli`` and ``sample_models``
copied in (``git archive REV | tar -x -C DIR; cp -r DIR/cli DIR/sample_models
DIR/gmcurv/``), run by this interpreter with ``PYTHONPATH=DIR``.

Run: ``python bench/cli/bench_wall.py [--rounds 8] [--baseline-src DIR --baseline-label REV]``
(writes ``bench/cli/results_wall.json`` and the table of ``bench/cli/WALL.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent / "distributed"))

from bench_distributed import write_workload  # noqa: E402

OUT = HERE / "results_wall.json"
MD = HERE / "WALL.md"  # its table between the markers is rewritten from the results
MARKS = ("<!-- bench_wall:start (written by bench_wall.py) -->", "<!-- bench_wall:end -->")
NAMES = {"--help": "`gmcurv --help`", "trace --help": "`gmcurv trace --help`",
         "check": "`gmcurv check`", "trace (sample)": "`gmcurv trace` (sample)",
         "trace W2": "`gmcurv trace` W2"}  # fmt: skip
SETUP = ("startup", "load", "validate")  # the report's stages that are not compute
TIME = "/usr/bin/time" if Path("/usr/bin/time").is_file() else None  # peak RSS (GNU time)

# what `python -m gmcurv ARGS` does, with two time stamps written to $WALL_STAMPS
DRIVER = """\
import time
_up = time.time()
import atexit, json, os, runpy, sys
def _stamp():
    with open(os.environ["WALL_STAMPS"], "w") as f:
        json.dump({"up": _up, "atexit": time.time()}, f)
atexit.register(_stamp)  # registered first: runs last
sys.argv = ["gmcurv", *sys.argv[1:]]
runpy.run_module("gmcurv", run_name="__main__", alter_sys=True)
"""

REPORT = {  # a small report for `gmcurv check`
    "schema_version": "1.0",
    "results": {
        "fisher": {
            "trace": {"value": 3.0, "stderr": None, "n_samples": 1, "method": "exact"},
        }
    },
}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def commands(tmp: Path) -> dict[str, tuple[list[str], bool]]:
    """name -> (arguments, writes a report)."""
    report = tmp / "check-me.json"
    report.write_text(json.dumps(REPORT))
    model, data, extra = write_workload("W2", tmp)
    return {
        "--help": (["--help"], False),
        "trace --help": (["trace", "--help"], False),
        "check": (["check", str(report), "fisher.trace > 100"], False),
        "trace (sample)": (["trace"], True),
        "trace W2": (["trace", str(model), str(data), *extra], True),
    }


def run(src: Path, args: list[str], report: bool, tmp: Path, threads: int | None) -> dict:
    """One command in a fresh process: wall, interpreter start, exit, peak RSS, timings."""
    out, stamps = tmp / "report.json", tmp / "stamps.json"
    out.unlink(missing_ok=True)
    stamps.unlink(missing_ok=True)
    env = {**os.environ, "GMCURV_NO_CONFIG": "1", "PYTHONPATH": str(src)}
    env["WALL_STAMPS"] = str(stamps)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    argv = [sys.executable, "-c", DRIVER, *args, *(["-q", "-o", str(out)] if report else [])]
    rss = tmp / "rss.txt"
    if TIME:  # GNU time forks the command from a small process: ru_maxrss is its own
        argv = [TIME, "-f", "%M", "-o", str(rss), *argv]
    t0 = time.time()
    proc = subprocess.run(argv, env=env, cwd=tmp, stdout=subprocess.DEVNULL, capture_output=False,
                          stderr=subprocess.PIPE)  # fmt: skip
    t1 = time.time()
    if proc.returncode not in (0, 1):  # `check` exits 1 when its rule holds
        err = proc.stderr.decode(errors="replace")[-2000:]
        raise SystemExit(f"{src}: gmcurv {' '.join(args)} exit {proc.returncode}:\n{err}")
    st = json.loads(stamps.read_text())
    row = {
        "wall": t1 - t0,
        "up": st["up"] - t0,
        "exit": t1 - st["atexit"],
        "rss_mb": int(rss.read_text().split()[-1]) / 1024 if TIME else None,
        "rc": proc.returncode,
    }
    if report:
        doc = json.loads(out.read_text())
        row["timings"] = doc["timings"]
        row["compute"] = sum(v for k, v in doc["timings"].items() if k not in SETUP)
        row["results"] = doc["results"]
    return row


def summarise(rows: list[dict]) -> dict:
    def stats(key: str, sub: str | None = None) -> dict:
        xs = [
            r[key] if sub is None else r[key].get(sub, 0.0) for r in rows if r.get(key) is not None
        ]
        return {"min": min(xs), "mean": statistics.fmean(xs)} if xs else {}

    out = {k: stats(k) for k in ("wall", "up", "exit", "rss_mb")}
    if "timings" in rows[0]:
        out["startup"] = stats("timings", "startup")
        out["load"] = stats("timings", "load")
        out["compute"] = stats("compute")
    return out


def table(doc: dict) -> str:
    """The markdown table of a run: new / baseline side by side (new alone without one)."""
    summary, sides = doc["summary"], list(doc["summary"])
    loads = [x for r in doc["load"] for x in (r["before"][0], r["after"][0])]
    vs = f", baseline = {doc['baseline'] or 'the baseline tree'}" if len(sides) > 1 else ""
    lines = [
        f"`{doc['command']}`: {doc['rounds']} rounds, {doc['cpus']} CPUs, load average "
        f"{min(loads):.1f}-{max(loads):.1f} (1 min) during the run; new = the tree run{vs}; "
        "seconds (mean unless marked)" + (", new / baseline" if len(sides) > 1 else "") + ".",
        "",
        "| command | wall min | wall mean | up | startup stage | compute | exit | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(c: str, key: str, stat: str = "mean", fmt: str = ".2f") -> str:
        vals = [summary[s][c].get(key, {}).get(stat) for s in sides]
        return " / ".join(format(v, fmt) for v in vals) if None not in vals else ""

    for c in summary[sides[0]]:
        row = [cell(c, "wall", "min"), cell(c, "wall"), cell(c, "up"), cell(c, "startup")]
        row += [cell(c, "compute"), cell(c, "exit"), cell(c, "rss_mb", fmt=".0f")]
        lines.append(f"| {NAMES.get(c, c)} | " + " | ".join(row) + " |")
    same = doc["results_identical_to_baseline"]
    if same:
        ok = all(same.values())
        lines += [
            "",
            "Reports' results identical to the baseline's: " + ("yes" if ok else str(same)),
        ]
    return "\n".join(lines)


def write_md(doc: dict, path: Path = MD) -> None:
    text = path.read_text()
    head, start, rest = text.partition(MARKS[0])
    _, end, tail = rest.partition(MARKS[1])
    if not (start and end):
        raise SystemExit(f"{path}: markers {MARKS} not found")
    path.write_text(f"{head}{MARKS[0]}\n{table(doc)}\n{MARKS[1]}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--baseline-src", type=Path, default=None, help="another gmcurv (module doc)")
    ap.add_argument("--baseline-label", default=None, help="what the baseline is (e.g. a commit)")
    ap.add_argument("--new-src", type=Path, default=ROOT, help="the gmcurv timed as 'new'")
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="time the commands whose name has one of these words (help, check, sample, W2)",
    )
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gmcurv-bench-wall-"))
    cmds = commands(tmp)
    if args.only:
        cmds = {k: v for k, v in cmds.items() if any(w in k for w in args.only)}
    sides = {"new": args.new_src.resolve()}
    if args.baseline_src:
        sides["baseline"] = args.baseline_src.resolve()
    runs: dict = {s: {c: [] for c in cmds} for s in sides}
    loads = []
    for r in range(args.rounds):
        before = load()
        order = list(cmds) if r % 2 == 0 else list(cmds)[::-1]
        for c in order:
            side_order = list(sides) if (r // 2) % 2 == 0 else list(sides)[::-1]
            for side in side_order:
                cmd, report = cmds[c]
                runs[side][c].append(run(sides[side], cmd, report, tmp, args.threads))
        loads.append({"round": r, "before": before, "after": load()})
        print(f"round {r + 1}/{args.rounds} done, load {loads[-1]['after']}", flush=True)
    summary = {s: {c: summarise(runs[s][c]) for c in cmds} for s in sides}
    same = {}
    if "baseline" in sides:  # the numbers must not change
        for c, (_, report) in cmds.items():
            if report:
                same[c] = all(
                    a["results"] == b["results"]
                    for a, b in zip(runs["new"][c], runs["baseline"][c], strict=True)
                )
    for s in sides:
        for c in cmds:
            for row in runs[s][c]:
                row.pop("results", None)
    doc = {
        "what": "wall time of whole gmcurv commands (fresh processes), outside and inside compute",
        "command": "python bench/cli/bench_wall.py " + " ".join(sys.argv[1:]),
        "rounds": args.rounds,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "threads": args.threads,
        "baseline": args.baseline_label,
        "results_identical_to_baseline": same,
        "load": loads,
        "summary": summary,
        "runs": runs,
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    if args.out.resolve() == OUT:  # the committed results: their table too
        write_md(doc)
        print(f"wrote the table of {MD}")
    head = f"{'command':16} {'side':8} {'wall min':>8} {'mean':>6} {'up':>5} {'startup':>7}"
    print(head + f" {'compute':>7} {'exit':>5} {'RSS MB':>6}")
    for c in cmds:
        for s in sides:
            m = summary[s][c]
            st = m.get("startup", {}).get("mean")
            cp = m.get("compute", {}).get("mean")
            print(
                f"{c:16} {s:8} {m['wall']['min']:8.3f} {m['wall']['mean']:6.3f} "
                f"{m['up']['mean']:5.3f} {'' if st is None else f'{st:7.3f}':>7} "
                f"{'' if cp is None else f'{cp:7.3f}':>7} {m['exit']['mean']:5.3f} "
                f"{m['rss_mb'].get('mean', float('nan')):6.0f}"
            )
    print(f"results identical to the baseline: {same}" if same else "")


if __name__ == "__main__":
    main()
