"""Merge `bench/fewshot.py --json` files of separate invocations into one table and plot.

    python bench/plot_fewshot.py bench/results/fewshot-*.json --plot docs/fewshot.png
    python bench/plot_fewshot.py new.json "old.json@(session 2)" --plot out.png   # label old.json's methods

The benchmark may be run method by method (same --work-dir); this refuses to merge files
whose evaluation episodes differ (`eval_hash`), so every line is scored on the same episodes.
`PATH@SUFFIX` appends SUFFIX to the method names of that file (e.g. the same method under
other settings); otherwise a method already read from an earlier file is skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge(paths: list[str | Path]) -> tuple[str, list[str], list[dict]]:
    rows, hashes, domains = [], set(), []
    for spec in paths:
        path, _, suffix = str(spec).partition("@")
        d = json.loads(Path(path).read_text())
        hashes.add(d["eval_hash"])
        domains = d["target_domains"]
        seen = {(r["method"], r["shots"]) for r in rows}
        named = [{**r, "method": f"{r['method']} {suffix}".strip()} for r in d["results"]]
        rows += [r for r in named if (r["method"], r["shots"]) not in seen]
    if len(hashes) != 1:
        raise SystemExit(f"refusing to merge: the files scored different episodes (eval hashes {sorted(hashes)})")
    return hashes.pop(), domains, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="--json files of bench/fewshot.py, each optionally PATH@SUFFIX")
    ap.add_argument("--plot", type=Path, required=True)
    args = ap.parse_args(argv)
    eval_hash, domains, rows = merge(args.json)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    shots = sorted({r["shots"] for r in rows})
    print(f"eval hash {eval_hash[:16]}; target domains {', '.join(domains)}")
    print("| method | " + " | ".join(f"{k}-shot" for k in shots) + " |")
    print("|---|" + "---|" * len(shots))
    cell = {(r["method"], r["shots"]): r for r in rows}
    for m in methods:
        print(f"| {m} | " + " | ".join(f"{cell[m, k]['accuracy']:.2f} ± {cell[m, k]['ci95']:.2f}"
                                      if (m, k) in cell else "-" for k in shots) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.4, 4.6), dpi=120)
    colors = plt.get_cmap("tab20").colors
    for i, m in enumerate(methods):
        ks = [k for k in shots if (m, k) in cell]
        shift = (i - (len(methods) - 1) / 2) * 0.05
        labelled = " " in m  # a PATH@SUFFIX file: earlier settings, drawn dashed
        ax.errorbar([k + shift for k in ks], [cell[m, k]["accuracy"] for k in ks],
                    yerr=[cell[m, k]["ci95"] for k in ks], marker="o", ms=3.5, capsize=2.5, lw=1.2,
                    color=colors[i % len(colors)], ls="--" if labelled else "-", label=m)
    ax.set_xticks(shots)
    ax.set_ylim(max(0.0, min(r["accuracy"] for r in rows) - 15.0), 100.0)
    ax.set_xlabel("shots per class (K)")
    ax.set_ylabel("accuracy (%), 15-way")
    ax.set_title(f"CLINC150 target domains: {', '.join(domains)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot)
    print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
