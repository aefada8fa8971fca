"""Benchmark: adapt all-MiniLM-L6-v2 to CLINC150 domains, compress, and score every recipe.

    python bench/compress.py                                # default domains, prints a table
    python bench/compress.py --domains banking,travel --json bench/results/compress.json
    python bench/compress.py --int8-compare                 # torch.ao vs torchao vs ONNX Runtime int8

CLINC150 is read at run time from ../shared/data/clinc150/clinc150.jsonl (or --data /
$METALOOP_CLINC150); none of its text is stored in this repository. Per domain: the 15
intents' train rows adapt the fp32 classifier (early stopping on the val rows), each
compression recipe is applied to it, and every model folder is scored on the domain's test
rows (30 per intent) with `metaloop.evaluate.evaluate` (size on disk, p50 latency at batch
1 and throughput at batch 32, inputs padded to 64 tokens).

--json PATH writes {"rows": [{"domain", "recipe", "size_mb", "p50_ms_batch1",
"throughput_batch32", "accuracy"}]} (recipe "fp32" is the uncompressed adapted model,
accuracy in percent), plus "meta" with the machine and settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import yaml

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "clinc150"
DEFAULT_DOMAINS = "banking,travel,kitchen_and_dining"

# Settings tuned on CLINC150 (see docs/compression.md); a --params YAML with `adapt:` and
# `compress:` sections overrides them.
ADAPT = {"strategy": "full", "epochs": 6, "lr": 8e-5, "head_lr": 2e-3, "batch_size": 32, "patience": 2}
COMPRESS = {
    "recipes": {
        "int8": ["int8"],
        "small": ["distill", "prune", "trim_vocab", "int8"],
    },
    "distill": {"layers": 4, "epochs": 10, "lr": 1e-4, "alpha": 0.7, "augment": 1, "patience": 3},
    "prune": {"heads_keep": 0.75, "ffn_keep": 0.5, "epochs": 5, "lr": 1e-4, "alpha": 0.7, "augment": 1},
    "trim_vocab": {"keep_chars": "ascii", "keep_frequent": 8000, "max_positions": 128},
    "int8": {"backend": "onnx", "per_channel": True, "optimize": True},
}


def read_clinc(data: Path) -> pd.DataFrame:
    path = data / "clinc150.jsonl" if data.is_dir() else data
    if not path.is_file():
        raise SystemExit(f"{path}: CLINC150 not found; pass --data or set METALOOP_CLINC150")
    table = pd.read_json(path, lines=True)
    table["id"] = [f"clinc-{i}" for i in range(len(table))]
    return table


def examples(rows: pd.DataFrame):
    from metaloop.adapt import Examples

    return Examples(list(map(str, rows["text"])), list(map(str, rows["label"])))


def eval_episodes(table: pd.DataFrame, domain: str, shots=(1, 5), draws: int = 2, seed: int = 13):
    from metaloop.episode_sets import eval_hash, eval_recipe
    from metaloop.episodes import Pool

    pool = Pool(table[table["domain"] == domain])
    eps = [eval_recipe(domain, k).sample(pool, seed, j) for k in shots for j in range(draws)]
    return eps, pool.texts, eval_hash(eps)


def fmt_table(rows: list[dict]) -> str:
    cols = ["domain", "recipe", "size_mb", "p50_ms_batch1", "throughput_batch32", "accuracy", "vs_fp32"]
    base = {r["domain"]: r for r in rows if r["recipe"] == "fp32"}
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        b = base.get(r["domain"])
        vs = ""
        if b and r["recipe"] != "fp32":
            vs = (f"size {100 * r['size_mb'] / b['size_mb']:.1f}%, {b['p50_ms_batch1'] / r['p50_ms_batch1']:.1f}x faster, "
                  f"acc {r['accuracy'] - b['accuracy']:+.2f}")
        lines.append(" | ".join([*(str(r.get(c, "")) for c in cols[:-1]), vs]))
    return "\n".join(lines)


def int8_compare(fp32_dir: Path, test, threads: int, seq_len: int, out_dir: Path, rounds: int) -> list[dict]:
    """The int8 paths on one fp32 classifier: size on disk, interleaved latency, test accuracy."""
    import numpy as np

    from metaloop.compress.quantize import onnx_int8, save_torch_int8
    from metaloop.compress.runtime import TorchClassifier, load_classifier, load_torch
    from metaloop.evaluate import interleaved_timing, size_on_disk

    model, tok, _ = load_torch(fp32_dir)
    info = {"recipe": "int8", "steps": ["int8"], "max_length": 64}
    folders = {
        "fp32 (torch)": fp32_dir,
        "torch.ao dynamic int8": save_torch_int8(model, tok, out_dir / "torch-ao", info),
        "onnxruntime int8": onnx_int8(model, tok, out_dir / "ort", info, optimize=True),
        "onnxruntime int8 (no fusion)": onnx_int8(model, tok, out_dir / "ort-nofuse", info, optimize=False),
        "onnxruntime fp32": onnx_int8(model, tok, out_dir / "ort-fp32", info, optimize=True, quantize=False),
    }
    clfs = {name: load_classifier(path, threads=threads) for name, path in folders.items()}
    sizes = {name: size_on_disk(path) / 1e6 for name, path in folders.items()}
    try:  # torchao: optional, in memory only (its tensor subclasses do not save without pickle)
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        m = load_torch(fp32_dir)[0]
        quantize_(m, Int8DynamicActivationInt8WeightConfig())
        name = "torchao int8 dyn-act/int8-weight (in memory)"
        clfs[name] = TorchClassifier(fp32_dir, m, tok, {}, 64)
        sizes[name] = sum(t.untyped_storage().nbytes() for t in m.state_dict().values()
                          if hasattr(t, "untyped_storage")) / 1e6
    except Exception as err:  # noqa: BLE001 - torchao is optional: not installed or unsupported here
        print(f"torchao: skipped ({type(err).__name__}: {str(err)[:200]})", flush=True)
    timing = interleaved_timing(clfs, test.texts, rounds=rounds, seq_len=seq_len)
    rows = []
    for name, clf in clfs.items():
        acc = 100 * float(np.mean([p == y for p, y in zip(clf.predict(test.texts), test.labels)]))
        t = timing[name]
        rows.append({"backend": name, "size_mb": round(sizes[name], 2), "p50_ms_batch1": round(t["p50_ms"], 2),
                     "ms_batch32": round(t["ms_batch"], 1), "accuracy": round(acc, 2)})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("METALOOP_CLINC150", DEFAULT_DATA)))
    ap.add_argument("--domains", default=DEFAULT_DOMAINS)
    ap.add_argument("--init", default="packaged:all-MiniLM-L6-v2")
    ap.add_argument("--recipes", default=None, help="comma-separated recipe names (default: all)")
    ap.add_argument("--params", type=Path, default=None,
                    help="YAML with adapt: / compress: sections (and meta: metric/scale/label_shots, backbone: pooling "
                         "for adapt.classifier: centroids)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compress")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for training and timing (default: all)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median taken)")
    ap.add_argument("--reuse", action="store_true", help="reuse adapted/compressed folders already under --out")
    ap.add_argument("--int8-compare", action="store_true", help="compare int8 backends on the first domain")
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    from metaloop.adapt import AdaptParams, adapt_domain, domain_data
    from metaloop.compress import CompressParams, compress, load_classifier
    from metaloop.evaluate import evaluate, interleaved_timing

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("metaloop").setLevel(logging.INFO)
    logging.getLogger().handlers[0].addFilter(lambda r: "pre-processing before quantization" not in r.getMessage())
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    from metaloop.config import Meta

    adapt_cfg, compress_cfg, raw = dict(ADAPT), dict(COMPRESS), {}
    if args.params:
        raw = yaml.safe_load(args.params.read_text()) or {}
        adapt_cfg.update(raw.get("adapt", {}))
        compress_cfg.update(raw.get("compress", {}))
    adapt_params = AdaptParams(**adapt_cfg)
    # adapt.classifier: centroids scores with meta-training's rule: the YAML's meta: keys, else metaloop's defaults
    rule = Meta(**{k: v for k, v in raw.get("meta", {}).items() if k in ("metric", "scale", "label_shots")})
    pooling = raw.get("backbone", {}).get("pooling", "mean")
    compress_params = CompressParams(**compress_cfg)
    recipes = args.recipes.split(",") if args.recipes else list(compress_params.recipes)
    table = read_clinc(args.data)
    rows, details, loads = [], [], []
    started = time.time()
    for domain in [d.strip() for d in args.domains.split(",") if d.strip()]:
        data = domain_data(table, domain, adapt_params, seed=args.seed)
        test = examples(table[(table["domain"] == domain) & (table["split"] == "test")])
        eps, texts_of, ehash = eval_episodes(table, domain, seed=args.seed)
        fp32_dir = args.out / domain / "fp32"
        if not (args.reuse and (fp32_dir / "config.json").is_file()):
            t0 = time.time()
            res = adapt_domain(args.init, table, domain, adapt_params, fp32_dir, seed=args.seed,
                               centroids=rule.centroids(), pooling=pooling)
            print(f"[{domain}] adapted in {time.time() - t0:.0f}s: val acc {res.val_accuracy}, "
                  f"epochs {res.epochs_run} (best {res.best_epoch})", flush=True)
        if args.int8_compare:
            cmp_rows = int8_compare(fp32_dir, test, threads, args.seq_len, args.out / domain / "int8-compare",
                                    args.rounds)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                meta = {"threads": threads, "load_avg_end": os.getloadavg(), "seq_len": args.seq_len,
                        "rounds": args.rounds, "domain": domain}
                args.json.write_text(json.dumps({"int8_compare": cmp_rows, "meta": meta}, indent=2) + "\n")
            return 0
        folders = {"fp32": fp32_dir}
        for name in recipes:
            out = args.out / domain / name
            folders[name] = out
            if not (args.reuse and (out / "config.json").is_file()):
                t0 = time.time()
                c = compress(fp32_dir, out, name, compress_params, train=data.train, val=data.val, seed=args.seed)
                details.append({"domain": domain, "recipe": name, "agreement_train": c.agreement_train,
                                "params": c.params_after, "seconds": c.seconds, "details": c.details})
                print(f"[{domain}/{name}] compressed in {time.time() - t0:.0f}s, agreement with teacher on "
                      f"train {100 * c.agreement_train:.1f}%, params {c.params_before} -> {c.params_after}", flush=True)
        # accuracy and size from `evaluate`; latency from an interleaved pass over all of them
        domain_rows = {}
        for name, folder in folders.items():
            r = evaluate(folder, domain=domain, recipe=name, test=test, episodes=eps, texts_of=texts_of,
                         eval_hash=ehash, threads=threads, seq_len=args.seq_len, warmup=2, repeats=5,
                         batch_repeats=2)
            domain_rows[name] = r.row()
        clfs = {name: load_classifier(folder, threads=threads) for name, folder in folders.items()}
        loads.append(os.getloadavg()[0])
        timing = interleaved_timing(clfs, test.texts, rounds=args.rounds, seq_len=args.seq_len)
        loads.append(os.getloadavg()[0])
        for name, row in domain_rows.items():
            t = timing[name]
            row.update(p50_ms_batch1=round(t["p50_ms"], 3), throughput_batch32=round(32_000 / t["ms_batch"], 1))
            rows.append(row)
            print(fmt_table([row]).splitlines()[-1], flush=True)
        if args.json:  # after every domain, so a long run's finished domains are never lost
            args.json.parent.mkdir(parents=True, exist_ok=True)
            meta = {"cpu": platform.processor() or platform.machine(), "threads": threads,
                    "load_avg_during_timing": loads, "seq_len": args.seq_len, "rounds": args.rounds,
                    "init": args.init, "adapt": adapt_params.model_dump(mode="json"),
                    "compress": compress_params.model_dump(mode="json"),
                    "minutes": round((time.time() - started) / 60, 1), "details": details}
            args.json.write_text(json.dumps({"rows": rows, "meta": meta}, indent=2, default=str) + "\n")
    print()
    print(fmt_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
