"""Fixtures for the model tests: one thread (2 shared cores) and a seeded micro model."""

from __future__ import annotations

import pytest
import torch

from fed_unimiss.models import UniMiSSNet, create_model


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def micro() -> UniMiSSNet:
    torch.manual_seed(0)
    return create_model("micro")
