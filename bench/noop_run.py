"""Benchmark: how long `metaloop run` takes when nothing changed (goal: <= 15 s here).

    make run                                  # once: trains and promotes champions
    python bench/noop_run.py                  # then: times the no-op run, prints a table
    python bench/noop_run.py --project DIR --repeats 5 --json bench/results/noop.json

Each repeat is a fresh `metaloop run` process, as cron or a user would start it: Python
and its imports, `dvc status`, the fingerprint, the comparison with the champions' tags in
MLflow and the champions table (the CLI checks before it starts Prefect's API; see
docs/pipeline.md). A repeat that does anything but "nothing changed" is an error: the
numbers would not be about the no-op path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHECK = re.compile(r"retrain: nothing changed .* in ([0-9.]+) s")


def one_run(project: Path, params: str) -> dict:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    start = time.time()
    proc = subprocess.run([str(BIN / "metaloop"), "run", "--params", params], cwd=project,
                          capture_output=True, text=True, env=env)
    total = time.time() - start
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or "retrain: nothing changed" not in out:
        raise SystemExit(f"`metaloop run` in {project} did not take the no-op path (exit {proc.returncode}). "
                         "Run `make run` there first so champions exist, and leave data, params and code "
                         "unchanged.\n" + out[-2000:])
    check = float(CHECK.search(out).group(1))
    phases = {"interpreter + CLI start": round(total - check, 2),
              "params, dvc status, registry, table": round(check, 2)}
    return {"seconds": round(total, 2), "phases": phases}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=ROOT, help="a metaloop project after a completed run")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    one_run(args.project, args.params)  # warm the OS file cache: cron runs on a box that is up
    runs = [one_run(args.project, args.params) for _ in range(args.repeats)]
    names = list(runs[0]["phases"])
    print(f"no-op `metaloop run`, {args.repeats} repeats, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(f"{'phase':32s} {'median s':>9s} {'min s':>7s} {'max s':>7s}")
    for name in names + ["total"]:
        vals = [r["seconds"] if name == "total" else r["phases"].get(name, float("nan")) for r in runs]
        print(f"{name:32s} {statistics.median(vals):9.2f} {min(vals):7.2f} {max(vals):7.2f}")
    median = statistics.median(r["seconds"] for r in runs)
    print(f"\ngoal <= 15 s: {'met' if median <= 15 else 'missed'} (median {median:.1f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": runs, "median_seconds": median,
                                         "cpus": os.cpu_count()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
