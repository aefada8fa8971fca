"""Copy a bench/fewshot.py work dir and put the uniform average of some of its ProtoNet
checkpoints into the copy's best checkpoint (weight averaging, docs/fewshot.md session 8).

    .venv/bin/python bench/average_checkpoints.py SRC_WORK DST_WORK best-00000140 step-00000210 ...

Then run bench/fewshot.py with --resume --work-dir DST_WORK: it exports and scores the average.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from metaloop.adapt import mean_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("checkpoints", nargs="+", help="folder names under meta/protonet/checkpoints")
    ap.add_argument("--algorithm", default="protonet")
    args = ap.parse_args()
    ck = args.src / "meta" / args.algorithm / "checkpoints"
    missing = [n for n in args.checkpoints if not (ck / n / "weights.safetensors").is_file()]
    if missing:
        raise SystemExit(f"no weights.safetensors for {missing} under {ck}; present: {sorted(p.name for p in ck.iterdir())}")
    if args.dst.exists():
        raise SystemExit(f"{args.dst} exists; give a new folder (the copy must not overwrite a run)")
    shutil.copytree(args.src, args.dst)
    ck = args.dst / "meta" / args.algorithm / "checkpoints"
    sds = [load_file(str(ck / n / "weights.safetensors")) for n in args.checkpoints]
    avg = mean_weights(sds)
    best = sorted(ck.glob("best-*"))
    if not best:
        raise SystemExit(f"{ck} has no best-* checkpoint to replace (the run had no meta-validation)")
    save_file(avg, str(best[-1] / "weights.safetensors"))
    print(f"averaged {args.checkpoints} into {best[-1]}")


if __name__ == "__main__":
    main()
