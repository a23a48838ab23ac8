"""docs/quality.md's section for the benchmark on real inputs (run_quality.py --data real).

Written between ``<!-- quality-real:begin -->`` and ``<!-- quality-real:end -->``; the figure
is docs/quality-real.png. Every comparison is paired by seed: pretraining seed s, probe seed s
(its voxel sample and its random reference encoder) and fine-tuning seed s (labelled subset,
patches, new layers) belong together, so the interval of a difference holds the variation of
the pretraining run itself.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from doc_markers import replace_section
from seed_pairs import paired, t_halfwidth

BEGIN, END = "<!-- quality-real:begin -->", "<!-- quality-real:end -->"
ARMS = ["random", "scratch", "central", "central_3d", "federated"]
LABELS = {
    "random": "random init",
    "scratch": "random init",
    "central": "centralized 2D+3D",
    "central_3d": "centralized 3D only",
    "federated": "federated 2D+3D, 2 sites",
}
# (question, a, b): the three questions, each a paired difference a - b. On the probe the
# random arm is the probe's random encoder of the seed; in fine-tuning it is ``scratch``.
QUESTIONS = [
    ("pretrained (central) - random", "central", "random"),
    ("2D+3D (central) - 3D only (central_3d)", "central", "central_3d"),
    ("federated - central", "federated", "central"),
]
# Does the federated start, too, beat a random one? (Not one of the three questions; asked
# beside them.)
FEDERATED_VS_RANDOM = ("pretrained (federated) - random", "federated", "random")
PROBE_STAGES = (3, 4)
PROBE_KINDS = (("knn", "k-NN"), ("linear", "linear"))


def span(d: dict) -> str:
    """A paired difference as ``mean [low, high]`` of its 95 % interval."""
    return f"{d['mean']:+.3f} [{d['mean'] - d['ci95']:+.3f}, {d['mean'] + d['ci95']:+.3f}]"


def reading(d: dict | None, unit: str = "") -> str:
    """A paired difference in words: which is better and by how much, or that the interval
    holds zero."""
    if d is None:
        return "not measured (fewer than two paired seeds)"
    lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
    span_text = f"{span(d)}{unit}"
    if lo > 0:
        return f"better by {span_text}"
    if hi < 0:
        return f"worse by {span_text}"
    return f"cannot be told apart: {span_text}"


def probe_values(rows: list[dict], arm: str, stage: int, kind: str) -> dict[int, float]:
    return {r["seed"]: r[kind] for r in rows if r["arm"] == arm and r["stage"] == stage}


def dice_values(rows: list[dict], arm: str, items: int) -> dict[int, float]:
    arm = "scratch" if arm == "random" else arm
    return {r["seed"]: r["dice_mean"] for r in rows
            if r["arm"] == arm and r["train_items"] == items}


def _cell(values: dict[int, float]) -> str:
    vals = [v for v in values.values() if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f} (n=1)"
    return f"{statistics.mean(vals):.3f} ± {t_halfwidth(vals):.3f} (n={len(vals)})"


def _label_counts(rows: list[dict]) -> list[int]:
    return sorted({r["train_items"] for r in rows})


def _present(rows: list[dict], arms: list[str]) -> list[str]:
    have = {r["arm"] for r in rows}
    return [a for a in arms if a in have]


def _probe_table(rows: list[dict]) -> list[str]:
    head = [f"stage {s} {name}" for s in PROBE_STAGES for _, name in PROBE_KINDS]
    lines = ["| encoder | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for arm in _present(rows, ["random", "central", "central_3d", "federated"]):
        cells = [_cell(probe_values(rows, arm, s, kind)) for s in PROBE_STAGES
                 for kind, _ in PROBE_KINDS]
        lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    return lines


def _dice_table(rows: list[dict]) -> list[str]:
    counts = _label_counts(rows)
    lines = ["| init | " + " | ".join(f"Dice, {n} labelled" for n in counts) + " |",
             "|---|" + "---|" * len(counts)]
    for arm in _present(rows, ["scratch", "central", "central_3d", "federated"]):
        lines.append(f"| {LABELS[arm]} | "
                     + " | ".join(_cell(dice_values(rows, arm, n)) for n in counts) + " |")
    return lines


def _question_table(probe_rows: list[dict], rows: list[dict],
                    questions: list[tuple[str, str, str]] = QUESTIONS) -> list[str]:
    metrics = [(f"probe stage {s} {name}", lambda arm, s=s, k=kind: probe_values(
        probe_rows, arm, s, k)) for s in PROBE_STAGES for kind, name in PROBE_KINDS]
    metrics += [(f"Dice, {n} labelled", lambda arm, n=n: dice_values(rows, arm, n))
                for n in _label_counts(rows)]
    lines = ["| metric | " + " | ".join(q for q, _, _ in questions) + " |",
             "|---|" + "---|" * len(questions)]
    for name, values in metrics:
        cells = [reading(paired(values(a), values(b))) for _, a, b in questions]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


ORGANS = ["spleen", "kidney_right", "kidney_left", "liver", "stomach", "aorta"]  # classes 1..6
FOUND = 0.1  # an organ counts as found in a run when its validation Dice exceeds this
# Per-organ paired differences: does a pretrained start learn an organ scratch does not, or
# lose one scratch learns?
ORGAN_QUESTIONS = [("central - scratch", "central", "scratch"),
                   ("federated - scratch", "federated", "scratch")]


def organ_values(rows: list[dict], arm: str, items: int, organ: int) -> dict[int, float | None]:
    """Validation Dice of class ``organ`` (1..6) per seed; None where the class was not scored."""
    out = {}
    for r in rows:
        if r["arm"] == arm and r["train_items"] == items:
            per = r.get("dice_per_class") or []
            out[r["seed"]] = per[organ] if len(per) > organ else None
    return out


def _organ_cell(values: dict[int, float | None]) -> str:
    vals = [v for v in values.values() if v is not None]
    if not vals:
        return "-"
    found = sum(v > FOUND for v in vals)
    return f"{statistics.mean(vals):.3f} ({found}/{len(vals)})"


def _organ_table(rows: list[dict]) -> list[str]:
    lines = ["| init | labelled | " + " | ".join(ORGANS) + " |",
             "|---|---|" + "---|" * len(ORGANS)]
    for n in _label_counts(rows):
        for arm in _present(rows, ["scratch", "central", "central_3d", "federated"]):
            cells = [_organ_cell(organ_values(rows, arm, n, c))
                     for c in range(1, len(ORGANS) + 1)]
            lines.append(f"| {LABELS[arm]} | {n} | " + " | ".join(cells) + " |")
    return lines


def _organ_difference_table(rows: list[dict]) -> list[str]:
    lines = ["| difference | labelled | " + " | ".join(ORGANS) + " |",
             "|---|---|" + "---|" * len(ORGANS)]
    have = {r["arm"] for r in rows}
    for name, a, b in ORGAN_QUESTIONS:
        if not {a, b} <= have:
            continue
        for n in _label_counts(rows):
            cells = []
            for c in range(1, len(ORGANS) + 1):
                d = paired(organ_values(rows, a, n, c), organ_values(rows, b, n, c))
                cells.append("-" if d is None else span(d))
            lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return lines


def markdown_real(results: dict) -> str:
    s, pre = results["settings"], results["pretraining"]
    rounds = next((v["rounds"] for v in pre.values() if "rounds" in v), None)
    seconds = {arm: [v["pretrain_seconds"] for v in pre.values() if v["arm"] == arm]
               for arm in ("central", "central_3d", "federated")}
    rows, probe_rows = results["rows"], results["probe_rows"]
    seeds = sorted({r["seed"] for r in rows} | {r["seed"] for r in probe_rows})
    missing = results.get("missing", [])
    lines = [
        f"Measured with `{results['command']}` ("
        f"{results.get('span_seconds', results['wall_seconds']) / 60:.0f} min from its first "
        "launch to its last finished step on 2 CPU cores shared with other jobs).",
        "",
        *([f"**Partial: {len(missing)} step(s) not finished** ({', '.join(missing)}); the "
           "same command resumes the run.", ""] if missing else []),
        f"Pretraining: site A = {results['sites']['A']}; site B = {results['sites']['B']}. "
        f"{s['pretrain_steps']} optimiser steps per arm and seed (federated: {rounds} rounds x "
        f"{s['local_steps']} local steps x 2 sites), pretraining seeds {s['pretrain_seeds']}. "
        f"Downstream: TotalSegmentator's example abdominal CT (six organs, kidneys by side), "
        f"3 training slabs, 2 validation slabs, at {results['ct_spacing']} mm, patch "
        f"{'x'.join(map(str, results['patch']))}; fine-tuning {s['epochs']} x "
        f"{s['steps_per_epoch']} steps, batch 2, lr {s['lr']}, seeds {seeds} (seed s starts "
        f"from pretraining seed s). Model: micro preset.",
        "",
        "Probe (`fed-unimiss probe`, balanced accuracy per voxel on the validation slabs, "
        "mean ± 95 % t-interval over seeds; the random row is the probe's random encoder of "
        "each seed):",
        "",
        *_probe_table(probe_rows),
        "",
        "Fine-tuning (`fed-unimiss finetune --task seg3d`, validation mean Dice over the six "
        "organs, mean ± 95 % t-interval over seeds):",
        "",
        *_dice_table(rows),
        "",
        "The three questions, as differences paired by seed (mean [95 % t-interval]; "
        "'random' is the probe's random encoder and, in fine-tuning, the scratch init):",
        "",
        *_question_table(probe_rows, rows),
        "",
        "The federated start against the same reference, paired by seed:",
        "",
        *_question_table(probe_rows, rows, [FEDERATED_VS_RANDOM]),
        "",
        f"Per-organ validation Dice (mean over seeds; in brackets the runs where the organ's "
        f"Dice exceeds {FOUND}, of all runs):",
        "",
        *_organ_table(rows),
        "",
        "Per-organ differences paired by seed (mean [95 % t-interval]):",
        "",
        *_organ_difference_table(rows),
        "",
        "Pretraining wall time per run (seconds, mean over seeds, two runs at a time): "
        + ", ".join(f"{arm} {statistics.mean(v):.0f}" for arm, v in seconds.items() if v) + ".",
        "",
        "![Real inputs: probe and fine-tuning by init](quality-real.png)",
    ]
    return "\n".join(lines)


def _color(arm: str) -> str:
    """One colour per init in both panels (the probe's random encoder is the scratch init)."""
    return f"C{['scratch', 'central', 'central_3d', 'federated'].index(arm.replace('random', 'scratch'))}"


def plot_real(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, probe_rows = results["rows"], results["probe_rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    counts = _label_counts(rows)
    for i, arm in enumerate(_present(rows, ["scratch", "central", "central_3d", "federated"])):
        for n in counts:
            vals = list(dice_values(rows, arm, n).values())
            x = n + (i - 1.5) * 0.08
            left.scatter([x] * len(vals), vals, s=10, color=_color(arm))
        means = [statistics.mean(dice_values(rows, arm, n).values() or [math.nan])
                 for n in counts]
        left.plot([n + (i - 1.5) * 0.08 for n in counts], means, color=_color(arm),
                  label=LABELS[arm])
    left.set_xticks(counts)
    left.set_xlabel("labelled training slabs")
    left.set_ylabel("validation mean Dice (6 organs)")
    left.set_title("fine-tuning (lines: mean, dots: seeds)")
    left.legend(fontsize=7)
    arms = _present(probe_rows, ["random", "central", "central_3d", "federated"])
    keys = [(s, kind) for s in PROBE_STAGES for kind, _ in PROBE_KINDS]
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        vals = [list(probe_values(probe_rows, arm, s, k).values()) for s, k in keys]
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(keys))]
        right.bar(xs, [statistics.mean(v) if v else math.nan for v in vals], width,
                  label=LABELS[arm], color=_color(arm))
        for x, v in zip(xs, vals, strict=True):
            right.scatter([x] * len(v), v, color="black", s=6, zorder=3)
    right.set_xticks(range(len(keys)), [f"stage {s}\n{k}" for s, k in keys])
    right.set_ylabel("balanced accuracy (validation voxels)")
    right.set_title("frozen-encoder probe (bars: mean, dots: seeds)")
    right.legend(fontsize=7)
    fig.suptitle("Real inputs: pretrained on DeepLesion/RICORD CT, NIH X-rays, head CT; "
                 "scored on an abdominal CT", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_real_section(results: dict, doc: Path, png: Path) -> int:
    """Write the section into ``doc`` and the figure to ``png``."""
    plot_real(results, png)
    text = doc.read_text() if doc.exists() else "# Quality\n"
    doc.write_text(replace_section(text, BEGIN, END, markdown_real(results)))
    print(f"wrote {doc} and {png}")
    return 0
