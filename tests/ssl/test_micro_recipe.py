"""The shipped micro recipe learns on phantom data: the loss falls by a clear margin, without
collapse.

One whole run of ``configs/pretrain/micro.yaml`` (600 steps: 15 blocks of 20 X-ray steps and 15 of
20 CT steps), one thread, on real files written by the data layer and cached by build_cache - the
data ``docs/pretraining.md`` measures (``fed-unimiss data phantom DIR --ct 4 --xray 32 --seed 1``).

"Loss" here is the DINO loss (``loss_2d``; ``loss_3d`` minus the KoLeo term), the quantity the
teacher and student disagree on. Early blocks are compared after the shared center has caught up
with each kind of output (the very first steps of a run, and of its first CT block, see a center
that is still 0 or still the X-ray mean, which makes the loss artificially low).

A falling loss with a collapsed teacher is failure, so the test also checks what the teacher
says about the whole data set at the end: different films and different CT regions land on
different prototypes (they all land on one or two at initialisation).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fed_unimiss.data.cache import SiteIndex, build_cache
from fed_unimiss.data.phantom import write_phantoms
from fed_unimiss.ssl.config import load_recipe, with_ssl
from fed_unimiss.ssl.engine import SelfDistillation
from fed_unimiss.ssl.site_data import SiteData

MICRO_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "micro.yaml"
# Thresholds from seeds 0-2 of the recipe x 1 and 2 threads (six runs; the thread count changes
# float summation order and so the whole trajectory), with margin - not from one machine's run.
# Late / early DINO loss measured: X-ray 0.52-0.69, CT 0.45-0.61.
MAX_LATE_OVER_EARLY = 0.8
# Teacher spread over the data set at the end (batch-mean minus per-sample entropy, nats):
# films 1.20-1.73, CT regions 0.53-0.97; at initialisation 0.02-0.12 / 0.02-0.18. The number of
# distinct argmax prototypes is not a robust sign: 4-7 CT prototypes at the end, but already 5 at
# initialisation for two seeds, and 3 on one reviewer's machine; only "more than one" is asserted.
MIN_SPREAD = {"xray": 0.8, "ct": 0.3}
MIN_GAIN = {"xray": 0.8, "ct": 0.25}
MIN_PROTOTYPES = 2
MAX_INITIAL_SPREAD = 0.3

def _dino(row: dict) -> float:
    if row["phase"] == "2d":
        return row["loss_2d"]
    return row["loss_3d"] - row.get("loss_koleo", 0.0)


def _mean_loss(hist: list[dict], phase: str, lo: int, hi: int) -> float:
    values = [_dino(r) for r in hist if r["phase"] == phase and lo <= r["step"] < hi]
    assert values, (phase, lo, hi)
    return sum(values) / len(values)


def _mean(hist: list[dict], phase: str, lo: int, key: str) -> float:
    values = [r[key] for r in hist if r["phase"] == phase and r["step"] >= lo]
    return sum(values) / len(values)


def _probe(engine: SelfDistillation, data: SiteData) -> dict[str, tuple[float, int]]:
    """Teacher spread (batch-mean minus per-sample entropy) and distinct argmax prototypes over
    every film (whole film at the crop size) and 9 fixed regions of every CT tile."""
    crop, depth, side = engine.cfg.crop_2d, engine.cfg.view_depth, engine.cfg.view_size
    films = torch.stack([data.xray[i] for i in range(len(data.xray))])
    films = F.interpolate(films, size=(crop, crop), mode="bilinear").expand(-1, 3, -1, -1)
    regions = []
    for i in range(len(data.ct)):
        tile = data.ct[i]
        _, d, h, w = tile.shape
        z = (d - depth) // 2
        for y in (0, (h - side) // 2, h - side):
            for x in (0, (w - side) // 2, w - side):
                regions.append(tile[:, z:z + depth, y:y + side, x:x + side])
    out = {}
    teacher, center, temp = engine.teacher.eval(), engine.loss_fn.center, engine.cfg.teacher_temp
    with torch.no_grad():
        for name, batch in (("xray", films), ("ct", torch.stack(regions))):
            p = F.softmax((teacher(batch) - center) / temp, dim=-1)
            h = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
            m = p.mean(0)
            hb = -(m * m.clamp_min(1e-12).log()).sum()
            out[name] = (float(hb - h), len(set(p.argmax(-1).tolist())))
    teacher.train()
    return out


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    recipe = with_ssl(load_recipe(MICRO_RECIPE), log_every=1)
    root = tmp_path_factory.mktemp("micro-recipe")
    write_phantoms(root / "ph", n_ct=4, n_xray=32, seed=1)
    build_cache([root / "ph"], root / "work", recipe.data)
    data = SiteData.from_index(SiteIndex.load(root / "work"))
    total = recipe.ssl.epochs * recipe.ssl.steps_per_epoch
    engine = SelfDistillation(recipe, total)
    before = _probe(engine, data)
    stats = engine.train_steps(data, 0, total)
    assert stats.steps == total == 600 and stats.skipped == 0
    return recipe, stats.history, before, _probe(engine, data)


@pytest.mark.slow
def test_micro_recipe_loss_falls_by_a_clear_margin(micro_run):
    _, hist, _, _ = micro_run
    assert [h["phase"] for h in hist[:60]] == ["2d"] * 20 + ["3d"] * 20 + ["2d"] * 20
    for phase, early, late in (("2d", (40, 100), (300, 600)), ("3d", (20, 80), (320, 600))):
        first, last = _mean_loss(hist, phase, *early), _mean_loss(hist, phase, *late)
        assert last < MAX_LATE_OVER_EARLY * first, (phase, round(first, 3), round(last, 3))


@pytest.mark.slow
def test_micro_recipe_does_not_collapse(micro_run):
    recipe, hist, before, after = micro_run
    uniform = math.log(recipe.model.head_out_dim)
    for phase, min_step_spread in (("2d", 0.8), ("3d", 0.3)):  # measured 1.3-1.4 / 0.5-0.6
        h = _mean(hist, phase, 450, "teacher_entropy")
        spread = _mean(hist, phase, 450, "batch_entropy") - h
        assert spread > min_step_spread and h < 0.5 * uniform, (phase, h, spread)
    for kind in ("xray", "ct"):
        spread, prototypes = after[kind]
        assert spread > MIN_SPREAD[kind] and prototypes >= MIN_PROTOTYPES, (kind, before, after)
        assert before[kind][0] < MAX_INITIAL_SPREAD, before  # starts nearly input-invariant
        assert spread - before[kind][0] > MIN_GAIN[kind], (kind, before, after)
