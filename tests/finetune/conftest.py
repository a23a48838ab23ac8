"""Fixtures of the fine-tuning tests (helpers in ft_phantoms.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ft_phantoms import write_cls2d_set


@pytest.fixture(scope="session")
def cls2d_data(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("cls2d")
    return write_cls2d_set(base / "train", 12, seed=3), write_cls2d_set(base / "val", 8, seed=4)
