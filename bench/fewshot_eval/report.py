"""The benchmark's results: per-method episode scores (`MethodRun`), the `Report`, and its
table, JSON and plot."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .methods import EpisodeScore, summarise
from .setup import EvalSet
from .stats import Summary


@dataclass
class MethodRun:
    name: str
    scores: list[EpisodeScore]
    eval_hash: str  # hash of the episodes this method was scored on
    train_seconds: float
    info: dict = field(default_factory=dict)

    def summary(self) -> dict[int, Summary]:
        return summarise(self.scores)

    def eval_seconds(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for s in self.scores:
            out[s.shots] = out.get(s.shots, 0.0) + s.seconds
        return out


@dataclass
class Report:
    evalset: EvalSet
    runs: list[MethodRun]
    config: dict
    machine: dict


def to_json(report: Report) -> dict:
    ev = report.evalset
    results = []
    for r in report.runs:
        secs = r.eval_seconds()
        for k, s in r.summary().items():
            results.append({"method": r.name, "shots": k, "accuracy": round(s.mean, 2), "ci95": round(s.ci95, 2),
                            "seconds": round(secs[k], 1)})
    per_domain = {r.name: {d: {str(k): round(statistics.fmean(s.accuracy for s in r.scores
                                                            if s.domain == d and s.shots == k), 2)
                               for k in sorted({s.shots for s in r.scores})}
                           for d in ev.domains} for r in report.runs}
    return {
        "target_domains": ev.domains,
        "eval_hash": ev.hash,
        "results": results,
        # provenance (beyond the schema)
        "eval_split": ev.split,
        "eval_hash_by_domain": ev.by_domain,
        "episodes_per_shot": {str(k): v.n for k, v in report.runs[0].summary().items()} if report.runs else {},
        "queries_by_domain": {d: len(next(e for e in ev.episodes if e.domain == d).query_ids) for d in ev.domains},
        "train_seconds": {r.name: round(r.train_seconds, 1) for r in report.runs},
        "per_domain": per_domain,
        "per_episode": [{"method": s.method, "episode": s.episode, "domain": s.domain, "shots": s.shots,
                         "accuracy": round(s.accuracy, 3), "seconds": round(s.seconds, 2)}
                        for r in report.runs for s in r.scores],
        "info": {r.name: r.info for r in report.runs},
        "config": report.config,
        "machine": report.machine,
    }


def format_table(report: Report) -> str:
    ev = report.evalset
    shots = sorted({k for r in report.runs for k in r.summary()})
    n = report.runs[0].summary()[shots[0]].n if report.runs else 0
    draws = n // max(1, len(ev.domains))
    where = "target domains (test split)" if ev.split == "test" else "DEV: meta-val domains (val split)"
    ways = sorted({e.ways for e in ev.episodes})
    lines = [
        (f"few-shot accuracy (%), {'/'.join(map(str, ways))}-way, mean ± 95% CI over {n} episodes per K "
        f"({len(ev.domains)} domains x {draws} support draws); {where}: {', '.join(ev.domains)}"),
        f"eval hash {ev.hash[:16]} (identical for every method)",
        "",
    ]
    head = f"{'method':<24}" + "".join(f"{f'{k}-shot':>16}" for k in shots) + f"{'train s':>10}" + \
        "".join(f"{f'eval s K={k}':>13}" for k in shots) + f"{'total s':>10}"
    lines += [head, "-" * len(head)]
    for r in report.runs:
        s, secs = r.summary(), r.eval_seconds()
        cells = "".join(f"{f'{s[k].mean:6.2f} ± {s[k].ci95:5.2f}':>16}" if k in s else f"{'-':>16}" for k in shots)
        total = r.train_seconds + sum(secs.values())
        lines.append(f"{r.name:<24}{cells}{r.train_seconds:>10.0f}" + "".join(f"{secs.get(k, 0):>13.0f}" for k in shots)
                     + f"{total:>10.0f}")
    m = report.machine
    lines += ["", (f"machine: {m['cpus']} CPUs, torch threads {m['threads']}, load average {m['load_start']} -> "
                  f"{m['load_end']}, wall {m['wall_seconds']:.0f}s")]
    return "\n".join(lines)


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ks = sorted({k for r in report.runs for k in r.summary()})
    dodge = 0.015 * (max(ks) - min(ks) or 1)  # side by side, so the CI bars stay readable
    low = 100.0
    for i, r in enumerate(report.runs):
        s = r.summary()
        xs = sorted(s)
        shift = (i - (len(report.runs) - 1) / 2) * dodge
        ax.errorbar([k + shift for k in xs], [s[k].mean for k in xs], yerr=[s[k].ci95 for k in xs], marker="o",
                    ms=4, capsize=3, label=r.name)
        low = min(low, *(s[k].mean for k in xs))
    ax.set_xticks(ks)
    ax.set_ylim(max(0.0, low - 15.0), 100.0)
    ax.set_xlabel("shots per class (K)")
    ax.set_ylabel("accuracy (%)")
    ev = report.evalset
    ax.set_title(f"{'CLINC150' if ev.split == 'test' else 'DEV (val split)'}: {', '.join(ev.domains)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
