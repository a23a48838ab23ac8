"""The model card (``README.md``) of an exported model, written from the run's own records.

A published model is read before it is loaded: what it is, how and on what it was trained, how
private that training was and how good the result is. The card says exactly what the
checkpoint records and nothing else: every fact is read from the checkpoint's JSON sidecar and,
for a federation, from the run's round log (``rounds.jsonl`` beside it, rows up to the
checkpoint's round). Where a record is missing the card says "not recorded"; it never fills a
gap with a default.

Layout: Hugging Face model card (YAML front matter, then Markdown sections), the convention
model hubs and readers expect.

Privacy of the card itself: :func:`card_facts` is a whitelist of numbers, site labels and a few
enumerated settings (exchange codecs, aggregation mode). A text value that looks like a path or
a file name is dropped ("not recorded"), so no path, file name or anything about an individual
image can reach the card, even if a record held one by mistake.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["NOT_RECORDED", "card_facts", "read_round_log", "render_card", "model_card",
           "finetune_card"]

NOT_RECORDED = "not recorded"

# A site label or setting may be a short word; anything with a path separator, a drive, a file
# extension or whitespace runs is not one of ours and is dropped.
_SAFE_TEXT = re.compile(r"^[A-Za-z0-9_\-=+ ,]{1,80}$")
_LABEL = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")

# The recipe settings a reader needs to judge or reproduce the pretraining (ssl section).
RECIPE_KEYS = ("epochs", "steps_per_epoch", "batch_size_2d", "batch_size_3d", "lr", "min_lr",
               "warmup_epochs", "weight_decay", "weight_decay_end", "momentum_teacher",
               "teacher_temp", "student_temp", "teacher_centering", "koleo_weight",
               "view_size", "view_depth", "crop_2d", "alternate_interval", "seed")
# The federation rules that decide what reached the global model.
FEDERATION_KEYS = ("local_steps", "min_sites", "aggregation", "trim_fraction", "norm_factor",
                   "min_cosine", "max_update_norm", "require_dp", "evaluate", "eval_batches",
                   "probe_every")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _safe(v: Any) -> Any:
    """A number, bool, short safe word or a list of those; anything else -> None."""
    if isinstance(v, bool) or _number(v):
        return v
    if isinstance(v, str):
        looks_like_file = re.search(r"\.[A-Za-z][A-Za-z0-9]{0,4}$", v) is not None
        return v if _SAFE_TEXT.match(v) and not looks_like_file else None
    if isinstance(v, (list, tuple)) and v and all(_number(x) for x in v):
        return list(v)
    return None


def _field(record: dict[str, Any], key: str) -> Any:
    """A recorded setting: "none" where the record holds null (e.g. no window), None (printed
    "not recorded") where it lacks the key or holds something unsafe."""
    if key in record and record[key] is None:
        return "none"
    return _safe(record.get(key))


def _label(v: Any) -> str | None:
    return str(v) if _LABEL.match(str(v)) else None


def read_round_log(checkpoint: str | Path, round_num: int | None) -> list[dict[str, Any]]:
    """The rows of ``rounds.jsonl`` beside a federated checkpoint, up to its round (in order).

    An absent or unreadable log gives no rows (the card then says "not recorded"); a damaged
    line is skipped, never guessed at.
    """
    if round_num is None:
        return []
    path = Path(checkpoint).parent / "rounds.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    rows: dict[int, dict[str, Any]] = {}
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and _number(row.get("round")) and 0 < row["round"] <= round_num:
            rows[int(row["round"])] = row  # a resumed run rewrites a round: the last one counts
    return [rows[k] for k in sorted(rows)]


def _sites_from_rows(rows: list[dict[str, Any]], last: dict[str, Any]) -> dict[str, Any]:
    """Per site: samples drawn (2D, 3D) summed over the rounds its update was accepted, the
    rounds it took part in, and its DP record (epsilon spent, budget)."""
    sources = rows or ([last] if last else [])
    sites: dict[str, dict[str, Any]] = {}
    for row in sources:
        for name, item in _dict(row.get("per_site")).items():
            label = _label(name)
            if label is None or not isinstance(item, dict):
                continue
            site = sites.setdefault(label, {"samples_2d": 0, "samples_3d": 0, "rounds": 0})
            site["rounds"] += 1
            for key in ("samples_2d", "samples_3d"):
                if _number(item.get(key)):
                    site[key] += int(item[key])
        for key in ("epsilon", "epsilon_budget", "dp_delta"):
            for name, value in _dict(row.get(key)).items():
                label = _label(name)
                if label is not None and _number(value):
                    sites.setdefault(label, {"samples_2d": 0, "samples_3d": 0, "rounds": 0})
                    sites[label][key] = float(value)  # the latest row wins: spent so far
    return dict(sorted(sites.items()))


def _evaluations(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Federated evaluation losses and probe accuracies recorded per round."""
    eval_rows, probe_rows = [], []
    for row in rows:
        if _number(row.get("eval_loss")):
            per_site = {lab: float(v) for k, v in _dict(row.get("eval_per_site")).items()
                        if (lab := _label(k)) is not None and _number(v)}
            eval_rows.append({"round": int(row["round"]), "loss": float(row["eval_loss"]),
                              "per_site": per_site})
        probe = _dict(row.get("probe"))
        weighted = _dict(probe.get("weighted"))
        if weighted:
            scores = {}
            for network in ("teacher", "student"):
                for stage, kinds in _dict(weighted.get(network)).items():
                    if not re.match(r"^stage[1-9]$", str(stage)):
                        continue
                    for kind in ("knn", "linear"):
                        if _number(_dict(kinds).get(kind)):
                            scores[f"{network} {stage} {kind}"] = float(kinds[kind])
            probe_rows.append({"round": int(row["round"]),
                               "after_rounds": probe.get("after_rounds")
                               if _number(probe.get("after_rounds")) else None,
                               "items": probe.get("items") if _number(probe.get("items")) else None,
                               "sites": sorted(lab for k in _dict(probe.get("per_site"))
                                               if (lab := _label(k)) is not None),
                               "scores": scores})
    return {"federated_evaluation": eval_rows, "probe": probe_rows}


def card_facts(meta: dict[str, Any], rows: list[dict[str, Any]], model: dict[str, Any],
               which: str, parameters: dict[str, int]) -> dict[str, Any]:
    """Everything the card may say, as a whitelisted mapping (the card is rendered from this).

    Args:
        meta: the checkpoint's JSON sidecar.
        rows: the run's round log up to the checkpoint's round (:func:`read_round_log`).
        model: the exported ModelConfig as a mapping.
        which: "student" or "teacher".
        parameters: parameter counts of the exported network ({"encoder": n, "decoder": n}).
    """
    run = _dict(meta.get("run"))
    recipe = _dict(run.get("recipe")) or _dict(meta.get("recipe"))
    federation = _dict(run.get("federation"))
    last = _dict(meta.get("round_log"))
    federated = _number(meta.get("round"))
    data_cfg, ssl = _dict(recipe.get("data")), _dict(recipe.get("ssl"))
    facts: dict[str, Any] = {
        "model": {k: _safe(model.get(k)) for k in (
            "preset", "embed_dims", "depths", "num_heads", "decoder_dims", "decoder_depths",
            "img_size_2d", "img_size_3d", "in_chans_2d", "in_chans_3d")},
        "network": which,
        "parameters": {k: int(v) for k, v in parameters.items()},
        "inputs": {k: _safe(data_cfg.get(k)) for k in (
            "hu_scale", "ct_spacing", "xray_size", "xray_default_spacing", "min_ct_slices",
            "min_xray_side")},
        "kind": "federated" if federated else "centralized",
        "recipe": {k: _field(ssl, k) for k in RECIPE_KEYS},
    }
    if federated:
        facts["rounds"] = int(meta["round"])
        facts["planned_rounds"] = _safe(run.get("rounds"))
        facts["federation"] = {k: _field(federation, k) for k in FEDERATION_KEYS}
        exchange = last.get("exchange") or next(
            (r.get("exchange") for r in reversed(rows) if r.get("exchange")), None)
        facts["exchange"] = _safe(exchange)
        privacy = _dict(federation.get("site_privacy"))
        facts["suggested_site_privacy"] = {k: _safe(v) for k, v in privacy.items()
                                           if k.startswith("dp-") and _safe(v) is not None}
        facts["sites"] = _sites_from_rows(rows, last)
        facts["round_log"] = bool(rows)
        facts["rejected"] = {int(r["round"]): sorted(lab for k in _dict(r.get("rejected"))
                                                     if (lab := _label(k)) is not None)
                             for r in rows if _dict(r.get("rejected"))}
        facts["last_loss"] = _safe(last.get("loss"))
        facts.update(_evaluations(rows))
    else:
        facts["step"] = _safe(meta.get("step"))
        facts["total_steps"] = _safe(meta.get("total_steps"))
        data = _dict(meta.get("data"))
        facts["data"] = {k: _safe(data.get(k)) for k in ("ct_volumes", "xrays")}
        facts["last_loss"] = _safe(_dict(meta.get("metrics")).get("loss"))
        facts["federated_evaluation"], facts["probe"] = [], []
    return facts


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def _v(value: Any) -> str:
    """A value as the card prints it; None is "not recorded"."""
    if value is None:
        return NOT_RECORDED
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return " x ".join(_v(x) for x in value)
    return str(value)


def _front_matter(f: dict[str, Any]) -> str:
    tags = ["medical-imaging", "self-supervised-learning", "unimiss", "mit", "ct", "x-ray",
            "pytorch", "monai"]
    if f["kind"] == "federated":
        tags.append("federated-learning")
    if any("epsilon" in s for s in f.get("sites", {}).values()):
        tags.append("differential-privacy")
    head = {
        "library_name": "pytorch",
        "license": "other",
        "pipeline_tag": "image-feature-extraction",
        "tags": tags,
        "model_name": f"fed-unimiss MiT {f['model']['preset'] or ''}".strip(),
    }
    return "---\n" + yaml.safe_dump(head, sort_keys=False) + "---\n"


def _what_it_is(f: dict[str, Any]) -> list[str]:
    m, p, i = f["model"], f["parameters"], f["inputs"]
    total = sum(p.values())
    hu = i["hu_scale"]
    return [
        "## What it is",
        "",
        f"The {f['network']} network of a UniMiSS self-distillation pretraining: a MiT "
        "encoder-decoder Transformer whose one set of Transformer weights reads 2D X-rays and "
        "3D CT (dimension-specific stems, patch and positional embeddings). No projection head "
        "and no task head: it gives features for fine-tuning.",
        "",
        "| | |",
        "|---|---|",
        f"| preset | {_v(m['preset'])} |",
        f"| network | {'teacher (the EMA of the student)' if f['network'] == 'teacher' else 'student'} |",
        f"| parameters | {total:,} (encoder {p.get('encoder', 0):,}, decoder "
        f"{p.get('decoder', 0):,}) |",
        f"| encoder widths / depths / heads | {_v(m['embed_dims'])} / {_v(m['depths'])} / "
        f"{_v(m['num_heads'])} |",
        f"| decoder widths / depths | {_v(m['decoder_dims'])} / {_v(m['decoder_depths'])} |",
        f"| pretraining input size | 2D {_v(m['img_size_2d'])} x {_v(m['img_size_2d'])}, "
        f"3D {_v(m['img_size_3d'])} (positional embeddings are interpolated to other sizes) |",
        "",
        "Input conventions (from the recipe's data section):",
        "",
        f"- 3D: `(B, {_v(m['in_chans_3d'])}, D, H, W)` CT in Hounsfield units divided by "
        f"{_v(hu)} (no clipping), resampled to {_v(i['ct_spacing'])} mm (D x H x W); "
        "slice axis first, rows anterior to posterior, columns right to left (MONAI axcodes "
        "`SPL`).",
        f"- 2D: `(B, {_v(m['in_chans_2d'])}, H, W)` X-rays with intensities in [0, 1], grey "
        f"repeated to 3 channels, resized to {_v(i['xray_size'])} pixels (X-rays without a "
        f"recorded pixel spacing were taken as {_v(i['xray_default_spacing'])} mm).",
        "- Minimum size: after the last patch embedding the token grid needs >= 2 positions: "
        "ceil(H/32) * ceil(W/32) >= 2 in 2D, ceil(D/16) * ceil(H/32) * ceil(W/32) >= 2 in 3D.",
        "",
    ]


def _how_trained(f: dict[str, Any]) -> list[str]:
    r = f["recipe"]
    out = ["## How it was trained", ""]
    if f["kind"] == "federated":
        fed = f["federation"]
        out += [
            f"Federated pretraining: {f['rounds']} round(s) completed (of "
            f"{_v(f['planned_rounds'])} planned), {_v(fed['local_steps'])} local steps per "
            "site and round; the global model is the aggregate of the accepted site updates.",
            "",
            "| federation setting | value |",
            "|---|---|",
            f"| exchange (codecs down / up, teacher) | {_v(f['exchange'])} |",
            f"| aggregation | {_v(fed['aggregation'])} (trim fraction "
            f"{_v(fed['trim_fraction'])}) |",
            f"| screening | update norm > {_v(fed['norm_factor'])} x the round median or "
            f"cosine < {_v(fed['min_cosine'])} rejected; absolute norm bound "
            f"{_v(fed['max_update_norm'])} |",
            f"| minimum sites per round | {_v(fed['min_sites'])} |",
            f"| DP required of every site | {_v(fed['require_dp'])} |",
        ]
        if f["rejected"]:
            out += ["", "Rejected updates (round: sites): " + "; ".join(
                f"{k}: {', '.join(v)}" for k, v in sorted(f["rejected"].items()))]
        elif not f["round_log"]:
            out += ["", f"Per-round records (rejections, evaluations): {NOT_RECORDED}."]
    else:
        out += [f"Centralized pretraining on pooled data: {_v(f['step'])} steps (of "
                f"{_v(f['total_steps'])} in the schedule)."]
    out += ["", "| recipe setting | value |", "|---|---|"]
    out += [f"| {k} | {_v(v)} |" for k, v in r.items()]
    out += ["", f"Last recorded training loss: {_v(f['last_loss'])} (self-distillation loss; "
            "not a quality measure).", ""]
    return out


def _on_what(f: dict[str, Any]) -> list[str]:
    out = ["## Training data", ""]
    if f["kind"] == "federated":
        if not f["sites"]:
            return out + [f"Sites: {NOT_RECORDED}.", ""]
        basis = ("summed over the rounds of the run's round log" if f["round_log"]
                 else "of the last round only (the run's round log was not available)")
        out += ["Counts of training samples drawn (2D: X-ray views; 3D: CT views) per site, "
                f"{basis}; a sample is one view, so an image can count several times. Each "
                "site's data never left the site.", "",
                "| site | rounds accepted | X-ray (2D) samples | CT (3D) samples |",
                "|---|---|---|---|"]
        out += [f"| {name} | {s['rounds']} | {s['samples_2d']} | {s['samples_3d']} |"
                for name, s in f["sites"].items()]
    else:
        d = f["data"]
        out += ["Pooled data of one centralized run:", "",
                f"- CT volumes: {_v(d['ct_volumes'])}", f"- X-rays: {_v(d['xrays'])}"]
    return out + [""]


def _privacy(f: dict[str, Any]) -> list[str]:
    out = ["## Privacy", ""]
    if f["kind"] != "federated":
        return out + ["Centralized training on pooled data: no federation, no differential "
                      "privacy recorded.", ""]
    out += ["Differential privacy is a per-site choice: a DP site clips and noises its "
            "per-patient gradients (DP-SGD) and accounts epsilon over the whole federation.", "",
            "| site | DP | epsilon spent | epsilon budget | delta |", "|---|---|---|---|---|"]
    for name, s in f["sites"].items():
        dp = "epsilon" in s or "epsilon_budget" in s
        out.append(f"| {name} | {'yes' if dp else 'no (none reported)'} | "
                   f"{_v(s.get('epsilon')) if dp else '-'} | "
                   f"{_v(s.get('epsilon_budget')) if dp else '-'} | "
                   f"{_v(s.get('dp_delta')) if dp else '-'} |")
    suggested = f["suggested_site_privacy"]
    if suggested:
        out += ["", "The federation config suggested to its sites: " + ", ".join(
            f"{k} {_v(v)}" for k, v in sorted(suggested.items()))
            + " (each site sets its own; the table gives what each DP site reported)."]
    return out + [""]


def _quality(f: dict[str, Any]) -> list[str]:
    out = ["## Quality", ""]
    evals, probes = f["federated_evaluation"], f["probe"]
    if not evals and not probes:
        return out + [f"Evaluation: {NOT_RECORDED} with this run. Measure before use, e.g. "
                      "`fed-unimiss probe --init MODEL_DIR ...` (frozen-feature k-NN and linear "
                      "probe) or `fed-unimiss finetune --init MODEL_DIR ...`.", ""]
    if evals:
        fed = f["federation"]
        out += [f"Federated evaluation (federation config `evaluate: true`, `eval_batches: "
                f"{_v(fed['eval_batches'])}`): each evaluating site's self-distillation loss of "
                "the global model on held-back local batches, weighted mean; lower is better. "
                "DP sites do not evaluate.", "",
                "| round | loss | per site |", "|---|---|---|"]
        out += [f"| {e['round']} | {_v(e['loss'])} | "
                + ", ".join(f"{k} {_v(v)}" for k, v in sorted(e["per_site"].items())) + " |"
                for e in evals]
        out.append("")
    if probes:
        fed = f["federation"]
        out += [f"Probe (federation config `probe_every: {_v(fed['probe_every'])}`): sites "
                "holding a labelled probe set ran the `fed-unimiss probe` protocol on the "
                "global model they received (encoder frozen; k-NN and linear balanced "
                "accuracy per encoder stage, mean over sites weighted by items scored).", ""]
        for p in probes:
            stages = sorted({k.split()[1] for k in p["scores"]})
            cols = [f"{n} {k}" for n in ("teacher", "student") for k in ("knn", "linear")]
            out += [f"After {_v(p['after_rounds'])} round(s) (round {p['round']}, sites "
                    f"{', '.join(p['sites']) or NOT_RECORDED}, {_v(p['items'])} items):", "",
                    "| stage | " + " | ".join(c.replace("knn", "k-NN") for c in cols) + " |",
                    "|---" * (len(cols) + 1) + "|"]
            out += [f"| {st} | " + " | ".join(_v(p["scores"].get(f"{c.split()[0]} {st} "
                                                                  f"{c.split()[1]}"))
                                              for c in cols) + " |" for st in stages]
            out.append("")
    return out


def _limitations(f: dict[str, Any]) -> list[str]:
    return [
        "## Intended use and limitations",
        "",
        "- Intended use: a starting point (backbone) for fine-tuning or probing on 2D X-ray and "
        "3D CT tasks, in research. It is not a medical device and makes no diagnosis.",
        "- It outputs features, not predictions: a task head must be trained and validated on "
        "the user's own labelled data.",
        f"- Inputs must follow the conventions above (HU / {_v(f['inputs']['hu_scale'])}, "
        "[0, 1] X-rays, spacing, axis order); other scales or orientations silently degrade the "
        "features.",
        "- It knows only the scanners, protocols and populations of the training data, of "
        "which this card records counts only; performance elsewhere is unknown until measured.",
        "- The training loss and any evaluation above are from the pretraining run; they are "
        "not a clinical validation.",
        "",
        "Formats: `fed-unimiss export` writes the weights (safetensors) and the configuration "
        "for `fed_unimiss.load_pretrained`; `--format torchscript` adds an encoder file plain "
        "PyTorch runs without fed-unimiss (fixed input sizes); `--format monai-bundle` writes a "
        "MONAI bundle whose network class comes from fed-unimiss.",
        "",
    ]


def render_card(facts: dict[str, Any]) -> str:
    """The card as Markdown with YAML front matter (Hugging Face model-card layout)."""
    title = f"# fed-unimiss MiT ({_v(facts['model']['preset'])}, {facts['network']}, " \
            f"{facts['kind']} pretraining)"
    lines = [title, "", "This card was written by `fed-unimiss export` from the pretraining "
             f"run's records only; \"{NOT_RECORDED}\" marks what the records do not hold.", ""]
    for part in (_what_it_is, _how_trained, _on_what, _privacy, _quality, _limitations):
        lines += part(facts)
    return _front_matter(facts) + "\n" + "\n".join(lines).rstrip() + "\n"


def model_card(checkpoint: str | Path, meta: dict[str, Any], model: dict[str, Any],
               which: str, parameters: dict[str, int]) -> str:
    """The card of an export of ``checkpoint`` (its sidecar ``meta`` and, for a federation,
    the run's round log beside it)."""
    round_num = int(meta["round"]) if _number(meta.get("round")) else None
    rows = read_round_log(checkpoint, round_num)
    return render_card(card_facts(meta, rows, model, which, parameters))


# ---------------------------------------------------------------------------------------------
# The card of a fine-tuned model (MONAI bundle of a seg3d fine-tune)
# ---------------------------------------------------------------------------------------------
FINETUNE_KEYS = ("mode", "epochs", "steps_per_epoch", "batch_size", "lr", "weight_decay",
                 "warmup_steps", "backbone_lr_scale", "layer_decay", "decoder_init",
                 "freeze_backbone_steps", "label_fraction", "seed", "patch_3d", "ct_spacing",
                 "hu_scale", "hu_window", "intensity", "foreground_prob", "flip_prob",
                 "sw_overlap", "deep_supervision")


def finetune_card(meta: dict[str, Any], metrics: dict[str, Any], model: dict[str, Any],
                  class_names: list[str] | None, parameters: int) -> str:
    """The card of a fine-tuned segmentation model, from its ``finetuned.json`` record and the
    run's ``metrics.json`` (validation result); the pretraining it started from is described
    by the whitelisted provenance the export's config.json carried into the record."""
    ft, init = _dict(meta.get("config")), _dict(meta.get("init"))
    num_classes = int(meta.get("num_classes") or 0)
    pre = _dict(init.get("pretraining"))
    data = _dict(metrics.get("data"))
    settings = {k: _field(ft, k) for k in FINETUNE_KEYS}
    kind = _safe(pre.get("kind"))
    head = {"library_name": "monai", "license": "other", "pipeline_tag": "image-segmentation",
            "tags": ["medical-imaging", "ct", "segmentation", "unimiss", "mit", "monai",
                     "pytorch"] + (["federated-learning"] if kind == "federated" else []),
            "model_name": f"fed-unimiss MiT {_safe(model.get('preset')) or ''} seg3d".strip()}
    lines = [
        f"# fed-unimiss MiT ({_v(_safe(model.get('preset')))}) fine-tuned for 3D CT "
        "segmentation", "",
        "This card was written by `fed-unimiss export --format monai-bundle` from the "
        f"fine-tuning run's records only; \"{NOT_RECORDED}\" marks what they do not hold.", "",
        "## What it is", "",
        f"A MiT encoder-decoder ({parameters:,} parameters with the segmentation head) that "
        f"labels every voxel of a CT volume with one of {num_classes} classes: "
        + (", ".join(f"{i} {n}" for i, n in enumerate(class_names)) if class_names else
           f"0..{num_classes - 1} (class names {NOT_RECORDED})") + ".", "",
        f"- Input: `(B, 1, D, H, W)` CT, intensity mode {_v(settings['intensity'])}"
        + (" (resolved at fine-tuning from the data set's modality, CT -> HU; the resolved "
           "mode is not recorded and the bundle applies the HU scaling)"
           if settings["intensity"] == "auto" else "")
        + (": per-volume z-score (mean 0, std 1)" if settings["intensity"] == "zscore" else
           f": HU / {_v(settings['hu_scale'])}")
        + ("" if settings["intensity"] == "zscore" else
           f" after clipping to {_v(settings['hu_window'])}"
           if settings["hu_window"] not in (None, "none") else " (no clipping)")
        + f", resampled to {_v(settings['ct_spacing'])} mm, axcodes `SPL`; whole volumes "
        f"are read by Gaussian sliding windows of {_v(settings['patch_3d'])} voxels.",
        "- Output: logits `(B, classes, D, H, W)`; the bundle's inference writes the arg-max "
        "label map on the input's grid.", "",
        "## How it was trained", "",
        f"`fed-unimiss finetune --task seg3d` from a {init.get('init') or NOT_RECORDED} start "
        f"(pretrained network: {_v(_safe(init.get('network')))}; pretraining: "
        f"{_v(kind)}"
        + (f", {_v(_safe(pre.get('round')))} rounds, sites "
           + ", ".join(lab for s in pre.get("sites", []) if (lab := _label(s)))
           if kind == "federated" else
           f", {_v(_safe(pre.get('step')))} steps" if kind == "centralized" else "")
        + ").", "",
        "| fine-tuning setting | value |", "|---|---|"]
    lines += [f"| {k} | {_v(v)} |" for k, v in settings.items()]
    lines += ["", "## Training data", "",
              f"- training items: {_v(_safe(data.get('train_items')))}",
              f"- validation items: {_v(_safe(data.get('val_items')))}",
              "(counts only; the fine-tuning data are the fine-tuner's own).", "",
              "## Privacy", "",
              "`fed-unimiss finetune` trains on one party's data and has no differential "
              "privacy. The pretraining's privacy (per site) is in the pretrained model's "
              "own card.", "",
              "## Quality", ""]
    dice = _safe(metrics.get("dice_mean"))
    per_class = metrics.get("dice_per_class")
    if dice is None:
        lines += [f"Validation: {NOT_RECORDED}.", ""]
    else:
        lines += ["Validation at the end of fine-tuning (`fed-unimiss finetune --task seg3d`: "
                  "MONAI Gaussian sliding-window inference over each whole validation volume; "
                  "Dice from true/false positive and false negative counts pooled over the "
                  "volumes):", "", f"- mean Dice over foreground classes: {_v(dice)}"]
        if isinstance(per_class, list):
            names = class_names or [f"class {i}" for i in range(len(per_class))]
            lines += [f"- Dice of {names[i] if i < len(names) else i}: "
                      f"{_v(_safe(v))}" for i, v in enumerate(per_class) if i > 0]
        lines.append("")
    lines += ["## Intended use and limitations", "",
              "- Research use; not a medical device and not clinically validated.",
              "- Validated only on the validation items counted above; performance on other "
              "scanners, protocols or populations is unknown until measured.",
              "- Inputs must follow the conventions above (intensity, spacing, orientation).",
              "- The bundle's network class is `fed_unimiss.finetune.monai_bundle."
              "MiTSegmentationNet`: the fed-unimiss package must be importable.", ""]
    return ("---\n" + yaml.safe_dump(head, sort_keys=False) + "---\n\n"
            + "\n".join(lines).rstrip() + "\n")
