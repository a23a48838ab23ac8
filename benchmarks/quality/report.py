"""Turn ``WORK/results.json`` of run_quality.py into docs/quality.md's results and a plot.

    python benchmarks/quality/report.py --work /tmp/quality [--doc docs/quality.md]

Writes the table between the ``<!-- quality:begin -->`` / ``<!-- quality:end -->`` markers of
the doc (the prose around them is kept) and the figure docs/quality.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from doc_markers import replace_section
from seed_pairs import paired, t_halfwidth

REPO = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
ARMS = ["scratch", "central", "central_teacher", "federated", "federated_fp32", "central_3d"]
LABELS = {
    "scratch": "scratch",
    "central": "centralized 2D+3D (student)",
    "central_teacher": "centralized 2D+3D (teacher)",
    "federated": "federated 2D+3D, 3 non-IID sites (int8 exchange)",
    "federated_fp32": "federated 2D+3D, uncompressed exchange",
    "central_3d": "centralized 3D only",
}
CLASSES = ["lung", "liver", "kidney", "bone", "lesion"]


def paired_difference(rows: list[dict], a: str, b: str, frac: float) -> dict | None:
    """Dice(a) - Dice(b) paired by seed (the seed fixes the labelled subset, the patches and
    the new layers for every arm, and on real inputs the pretraining run too)."""
    da = {r["seed"]: r["dice_mean"] for r in rows if r["arm"] == a and r["fraction"] == frac}
    db = {r["seed"]: r["dice_mean"] for r in rows if r["arm"] == b and r["fraction"] == frac}
    return paired(da, db)


# The questions of docs/quality.md, as paired comparisons (question, a, b, non-inferiority).
# Whether federated pretraining *reaches* centralized, and whether the compressed exchange reaches
# the uncompressed one, are non-inferiority questions: yes when the whole interval of
# Dice(a) - Dice(b) lies above -REACH_MARGIN.
QUESTIONS = [
    ("does pretraining beat scratch at few labels?", "central", "scratch", False),
    ("do X-rays + CT beat CT only?", "central", "central_3d", False),
    ("does federated pretraining reach centralized?", "federated", "central", True),
    ("... with the uncompressed exchange?", "federated_fp32", "central", True),
    ("does the compressed exchange reach the uncompressed one?", "federated", "federated_fp32",
     True),
]
REACH_MARGIN = 0.02  # Dice; a difference this small is below what the task's seeds resolve


def verdicts(rows: list[dict]) -> list[str]:
    """One line per question: the paired difference and what it supports."""
    frac = min({r["fraction"] for r in rows})
    lines = []
    for question, a, b, reach in QUESTIONS:
        d = paired_difference(rows, a, b, frac)
        if d is None:
            lines.append(f"- {question} Not measured ({a} or {b} missing).")
            continue
        lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
        if reach and lo > -REACH_MARGIN:
            word = (f"yes, within the margin: {a} is not below {b} by more than "
                    f"{REACH_MARGIN} Dice (non-inferiority)")
        elif lo > 0:
            word = f"yes: {a} is above {b}"
        elif hi < 0:
            word = f"no: {a} is below {b}"
        else:
            word = "cannot be told at this size: the interval holds 0"
        lines.append(f"- {question} Dice({a}) - Dice({b}) = {d['mean']:+.3f}, 95 % CI "
                     f"[{lo:+.3f}, {hi:+.3f}], n = {d['n']} paired seeds, "
                     f"{frac:.1%} labels: {word}.")
    return lines


def summarise(rows: list[dict]) -> dict[tuple[str, float], dict]:
    """(arm, fraction) -> mean, sd, n of dice_mean and the per-class means."""
    out = {}
    for arm in ARMS:
        for frac in sorted({r["fraction"] for r in rows}):
            sel = [r for r in rows if r["arm"] == arm and r["fraction"] == frac]
            vals = [r["dice_mean"] for r in sel if r["dice_mean"] is not None]
            if not vals:
                continue
            per_class = []
            for c in range(1, 6):
                cv = [r["dice_per_class"][c] for r in sel
                      if len(r["dice_per_class"]) > c and r["dice_per_class"][c] is not None]
                per_class.append(statistics.mean(cv) if cv else math.nan)
            out[(arm, frac)] = {
                "mean": statistics.mean(vals),
                "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "ci95": t_halfwidth(vals),
                "n": len(vals),
                "seeds": [round(v, 3) for v in vals],
                "per_class": per_class,
            }
    return out


def markdown(results: dict, summary: dict) -> str:
    s = results["settings"]
    fracs = sorted({f for _, f in summary})
    lines = [
        f"Measured with `{results['command']}` (wall time "
        f"{results['wall_seconds'] / 60:.0f} min on 2 shared CPU cores).",
        "",
        f"Sizes: pretraining sites A = {s['ct_per_site']} CT, B = {s['xray_per_site']} X-rays, "
        f"C = {s['ct_per_site']} CT + {s['xray_per_site']} X-rays (phantoms, distinct seeds); "
        f"{s['pretrain_steps']} optimiser steps per pretraining arm (federated: "
        f"{results['pretraining']['federated'].get('rounds')} rounds x {s['local_steps']} local "
        f"steps x 3 sites); seg3d fine-tuning on {s['train_ct']} labelled CT "
        f"({min(s['fractions']):.1%} = {max(1, round(min(s['fractions']) * s['train_ct']))} volume), "
        f"validation on {s['val_ct']} CT, "
        f"{s['epochs']} epochs x {s['steps_per_epoch']} steps, batch 2, patch "
        f"{'x'.join(map(str, results['patch']))} at {results['ct_spacing']} mm, lr {s['lr']}; "
        f"seeds {s['seeds']}. Model: micro preset."
        + (f" Real unlabelled CT added to the pretraining sites: {s['real_ct']}."
           if s.get("real_ct") else ""),
        "",
        "| init | " + " | ".join(f"Dice @ {f:.1%} labels (mean ± 95 % CI, n)" for f in fracs)
        + " |",
        "|---|" + "---|" * len(fracs),
    ]
    for arm in ARMS:
        cells = []
        for f in fracs:
            m = summary.get((arm, f))
            cells.append(f"{m['mean']:.3f} ± {m['ci95']:.3f} (n={m['n']})" if m else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    lines += ["", "The questions (paired by seed):", "", *verdicts(results["rows"])]
    lines += ["", f"Per-class Dice at {max(fracs):.1%} labels (mean over seeds):", "",
              "| init | " + " | ".join(CLASSES) + " |", "|---|" + "---|" * len(CLASSES)]
    top = max(fracs)
    for arm in ARMS:
        m = summary.get((arm, top))
        if m:
            lines.append(f"| {LABELS[arm]} | " + " | ".join(
                "-" if math.isnan(v) else f"{v:.3f}" for v in m["per_class"]) + " |")
    lines += ["", "Pretraining wall time (seconds): " + ", ".join(
        f"{k} {v['pretrain_seconds']:.0f}" for k, v in results["pretraining"].items()
        if k != "central_teacher") + ".", "", "![Dice by init and label fraction](quality.png)"]
    return "\n".join(lines)


def plot(summary: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fracs = sorted({f for _, f in summary})
    arms = [a for a in ARMS if any((a, f) in summary for f in fracs)]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(fracs))]
        means = [summary.get((arm, f), {}).get("mean", math.nan) for f in fracs]
        sds = [summary.get((arm, f), {}).get("ci95", 0.0) for f in fracs]
        ax.bar(xs, means, width, yerr=sds, capsize=3, label=LABELS[arm])
        for x, f in zip(xs, fracs, strict=True):
            pts = [r["dice_mean"] for r in rows if r["arm"] == arm and r["fraction"] == f]
            ax.scatter([x] * len(pts), pts, color="black", s=8, zorder=3)
    ax.set_xticks(range(len(fracs)), [f"{f:.1%} labels" for f in fracs])
    ax.set_ylabel("validation mean Dice (5 organs)")
    ax.set_title("seg3d on phantom CT: init vs label fraction (bars: mean ± 95 % CI, dots: seeds)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "quality.md")
    p.add_argument("--png", type=Path, default=None,
                   help="the figure (default docs/quality.png, real inputs docs/quality-real.png)")
    a = p.parse_args(argv)
    results = json.loads((a.work / "results.json").read_text())
    if results["settings"].get("data") == "real":
        from report_real import write_real_section

        return write_real_section(results, a.doc, a.png or REPO / "docs" / "quality-real.png")
    a.png = a.png or REPO / "docs" / "quality.png"
    summary = summarise(results["rows"])
    plot(summary, results["rows"], a.png)
    text = a.doc.read_text() if a.doc.exists() else "# Quality\n"
    a.doc.write_text(replace_section(text, BEGIN, END, markdown(results, summary)))
    json.dump({f"{k[0]}@{k[1]}": v for k, v in summary.items()}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
