"""Benchmark: what serving a domain costs, champion against fp32, the registry and a peer.

    make run                                   # once: a project with registered champions
    python bench/serving.py                    # hospitality; prints a table
    python bench/serving.py --domain hospitality --json bench/results/serving.json

Rows, each measured in a fresh process on the same texts (the domain's curated test rows):
  champion  the registered int8 folder through `metaloop.serving` (ONNX Runtime, no torch)
  fp32      the adapted fp32 folder through `metaloop.serving` (torch)
  pyfunc    the registry round trip: `mlflow.pyfunc.load_model("models:/...@champion")` + predict
  peer      what a user would otherwise deploy: sentence-transformers all-MiniLM-L6-v2 embeddings
            + scikit-learn logistic regression fitted on the domain's train rows (SetFit's head
            without its contrastive step). Benchmark-only: pip install sentence-transformers
            scikit-learn (never project dependencies).

Figures: p50 / p95 ms at batch 1, rows/s at batch 32 and 256, cold load (import + load, in
seconds, until the first prediction is back), resident memory after the runs (MB). Every
process uses the same number of threads (--threads, default: all cores).
Goals (issue 22): champion throughput at batch 32 >= 3x fp32 and >= 2x the peer; champion
p50 at batch 1 <= 5 ms; cold load <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("champion", "fp32", "pyfunc", "peer")


def _texts(project: Path, domain: str, split: str) -> tuple[list[str], list[str]]:
    import pandas as pd

    t = pd.read_parquet(project / "data" / "curated" / "curated.parquet")
    t = t[(t["domain"] == domain) & (t["split"] == split)]
    return t["text"].tolist(), t["label"].tolist()


def _load(kind: str, project: Path, domain: str):
    """(predict function over a list of texts) for one row, loaded the way it is served."""
    if kind in ("champion", "fp32"):
        from metaloop.serving import load_classifier

        folder = project / "artifacts" / "adapted" / domain / ("int8" if kind == "champion" else "fp32")
        clf = load_classifier(folder)
        return lambda texts: clf.top_k(texts, 1)
    if kind == "pyfunc":
        import mlflow.pyfunc

        model = mlflow.pyfunc.load_model(f"models:/metaloop-{domain}@champion")
        return lambda texts: model.predict(texts)
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression

    from metaloop.backbone import resolve

    encoder = SentenceTransformer(str(resolve("packaged:all-MiniLM-L6-v2")), device="cpu")
    x, y = _texts(project, domain, "train")
    head = LogisticRegression(max_iter=1000).fit(encoder.encode(x, batch_size=64), y)
    return lambda texts: head.predict(encoder.encode(texts, batch_size=len(texts)))


def worker(kind: str, project: Path, domain: str, repeats: int) -> dict:
    start = time.perf_counter()
    predict = _load(kind, project, domain)
    texts, _ = _texts(project, domain, "test")
    predict(texts[:1])
    cold = time.perf_counter() - start
    for t in texts[:10]:
        predict([t])  # warm-up
    one = []
    for i in range(repeats):
        t0 = time.perf_counter()
        predict([texts[i % len(texts)]])
        one.append(1000 * (time.perf_counter() - t0))
    pool = (texts * (256 // len(texts) + 1))[:256]
    rates = {}
    for batch in (32, 256):
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 3.0 or n < 2 * batch:
            predict(pool[:batch])
            n += batch
        rates[batch] = n / (time.perf_counter() - t0)
    import resource

    q = statistics.quantiles(one, n=20)
    return {"model": kind, "p50_ms_batch1": round(statistics.median(one), 2), "p95_ms_batch1": round(q[18], 2),
            "throughput_batch32": round(rates[32], 1), "throughput_batch256": round(rates[256], 1),
            "cold_load_s": round(cold, 2), "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, default=ROOT, help="a folder `make run` has trained in")
    ap.add_argument("--domain", default="hospitality")
    ap.add_argument("--repeats", type=int, default=300, help="batch-1 predictions timed per row")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--only", nargs="*", choices=KINDS, default=list(KINDS))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    project = args.project.resolve()
    os.chdir(project)  # relative MLflow artifact locations, as `make run` wrote them
    if args.worker:
        print(json.dumps(worker(args.worker, project, args.domain, args.repeats)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MLFLOW_DISABLE_TELEMETRY": "true",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")}
    rows = []
    for kind in args.only:
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--project", str(project), "--domain",
                               args.domain, "--repeats", str(args.repeats)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            hint = " (pip install sentence-transformers scikit-learn: benchmark-only)" if kind == "peer" else ""
            print(f"{kind}: failed{hint}\n{proc.stderr[-1500:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  measured {kind}", file=sys.stderr)
    cols = ["p50_ms_batch1", "p95_ms_batch1", "throughput_batch32", "throughput_batch256", "cold_load_s", "rss_mb"]
    print(f"| model ({args.domain}, {args.threads} threads) | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in rows:
        print(f"| {r['model']} | " + " | ".join(str(r[c]) for c in cols) + " |")
    by = {r["model"]: r for r in rows}
    if {"champion", "fp32", "peer"} <= by.keys():
        c = by["champion"]
        print(f"\nchampion vs fp32 at batch 32: {c['throughput_batch32'] / by['fp32']['throughput_batch32']:.1f}x "
              f"(goal 3x); vs peer: {c['throughput_batch32'] / by['peer']['throughput_batch32']:.1f}x (goal 2x); "
              f"p50 {c['p50_ms_batch1']} ms (goal <= 5); cold load {c['cold_load_s']} s (goal <= 2)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
