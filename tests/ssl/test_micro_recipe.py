"""The shipped micro recipe on varied phantom films: the teacher tells the images apart.

Bounded (60 steps: an X-ray block, a CT block, an X-ray block), one thread, real files written by
the data layer and cached by build_cache. The collapse signs are the quantities docs/pretraining.md
reports: per-sample teacher entropy H, batch-mean entropy Hb, their difference (the mutual
information between the sample and the teacher's prototype)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fed_unimiss.data.cache import SiteIndex, build_cache
from fed_unimiss.data.phantom import write_phantoms
from fed_unimiss.ssl.config import load_recipe, with_ssl
from fed_unimiss.ssl.engine import SelfDistillation
from fed_unimiss.ssl.site_data import SiteData

MICRO_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "micro.yaml"
STEPS = 60  # schedule blocks of 20: X-ray 0-19, CT 20-39, X-ray 40-59
# Measured (16 films, seed 1, one thread): Hb - H 0.40 (CT block) and 0.43 (2nd X-ray block),
# H 0.51-0.66 x log(out_dim); DINO loss second half / first half of a block 0.93 (CT), 0.97 (X-ray).
# The recipe before KoLeo gave Hb - H 0.02-0.05 and H 0.85-0.99 x log(out_dim).
SPREAD, H_FRACTION = 0.25, 0.8
# The DINO loss of this recipe does not yet fall reliably within 60 steps (docs/pretraining.md,
# "Known limitation"); tests/ssl/test_training.py shows the loss falling with short settings.


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    recipe = with_ssl(load_recipe(MICRO_RECIPE), log_every=1)
    root = tmp_path_factory.mktemp("micro-recipe")
    write_phantoms(root / "ph", n_ct=2, n_xray=16, seed=1)
    build_cache([root / "ph"], root / "work", recipe.data)
    data = SiteData.from_index(SiteIndex.load(root / "work"))
    engine = SelfDistillation(recipe, recipe.ssl.epochs * recipe.ssl.steps_per_epoch)
    stats = engine.train_steps(data, 0, STEPS)
    assert stats.steps == STEPS and stats.skipped == 0
    return recipe, stats.history


@pytest.mark.slow
def test_micro_teacher_tells_images_apart(micro_run):
    recipe, hist = micro_run
    assert [h["phase"] for h in hist] == ["2d"] * 20 + ["3d"] * 20 + ["2d"] * 20
    uniform = math.log(recipe.model.head_out_dim)
    for block in (hist[20:40], hist[40:60]):  # after the center has caught up
        h, hb = _mean(block, "teacher_entropy"), _mean(block, "batch_entropy")
        assert hb - h > SPREAD, (block[0]["step"], round(h, 3), round(hb, 3))
        assert h < H_FRACTION * uniform, (block[0]["step"], round(h, 3))
