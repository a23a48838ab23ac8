"""Replays: a fixed coordinate sample of every sent state, and the near-copy test on it."""

from __future__ import annotations

import torch

from aggregator.replays import NEAR, CoordinateSample, ReplayGuard
from fed_unimiss import exchange_codec as codec


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"student.a": scale * torch.randn(300, 40, generator=g),
            "student.b": scale * torch.randn(77, generator=g),
            "teacher.a": scale * torch.randn(300, 40, generator=g),
            "center": scale * torch.randn(1, 50, generator=g)}


def _moved(state, seed, size):
    step = _state(seed, size)
    return {k: v + step[k] for k, v in state.items()}


def test_the_sample_is_fixed_per_layout_and_gathered_tensor_by_tensor():
    state = _state(0)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    a, b = CoordinateSample(shapes, per_part=500), CoordinateSample(shapes, per_part=500)
    whole = a.of(state)
    assert set(whole) == {"student", "teacher"} and whole["student"].numel() == 500
    streamed = b.empty()
    for name in reversed(list(state)):  # any order: each tensor writes its own slots
        b.take(streamed, name, state[name])
    assert all(torch.equal(whole[p], streamed[p]) for p in whole)
    values = torch.cat([state["student.a"].reshape(-1), state["student.b"]]).double()
    assert all(bool((values == v).any()) for v in whole["student"][:50])  # real coordinates


def test_an_int8_re_encoded_replay_is_a_near_copy_and_an_honest_update_is_not():
    shapes = {k: tuple(v.shape) for k, v in _state(0).items()}
    sample = CoordinateSample(shapes)
    g1 = _state(0)
    g2 = _moved(g1, 1, 0.01)  # the global model after round 1
    guard = ReplayGuard()
    guard.remember_sent(sample.of(g1), "the global state sent in round 1")
    items = codec.layout(g2, g2)
    values, scales = codec.pack_update(g1, g2, "q8_delta", items)  # round 1's state, as int8
    replay = dict(codec.unpack_update(values, scales, "q8_delta", g2))
    why = guard.near_replay(sample.of(replay), sample.of(g2), sample.of(g2))
    assert why is not None and "from the global state sent in round 1 (a stale replay" in why
    honest = _moved(g2, 2, 0.01)  # trained on from round 2's state: moves away from both
    assert guard.near_replay(sample.of(honest), sample.of(g2), sample.of(g2)) is None
    # even an update as small as the global's own movement, pointing back half the way
    back = {k: g2[k] + 0.5 * (g1[k] - g2[k]) + 0.005 * _state(3)[k] for k in g2}
    assert guard.near_replay(sample.of(back), sample.of(g2), sample.of(g2)) is None
    assert NEAR < 0.5


def test_nothing_trained_is_left_to_the_exact_checks():
    shapes = {k: tuple(v.shape) for k, v in _state(0).items()}
    sample = CoordinateSample(shapes)
    guard = ReplayGuard()
    g = _state(0)
    guard.remember_sent(sample.of(g), "the global state sent in round 1")
    assert guard.near_replay(sample.of(g), sample.of(g), sample.of(g)) is None  # no update: no ratio


def test_a_replay_is_judged_as_the_site_sent_it_not_as_its_update_was_decoded():
    """Under bf16 down the site trains from bf16(global) and its update is added to the fp32
    global: the decoded replay carries the global's bf16 rounding, which is far larger than a
    round's movement. Compared as the site sent it, it is round 1's state again."""
    shapes = {k: tuple(v.shape) for k, v in _state(0).items()}
    sample = CoordinateSample(shapes)
    g1 = _state(0)
    g2 = _moved(g1, 1, 1e-3)
    sent1 = {k: codec.bf16_round(v) for k, v in g1.items()}
    sent2 = {k: codec.bf16_round(v) for k, v in g2.items()}
    guard = ReplayGuard()
    guard.remember_sent(sample.of(sent1), "the global state sent in round 1")
    decoded = {k: g2[k] + (sent1[k] - sent2[k]) for k in g2}  # the site returned sent1
    why = guard.near_replay(sample.of(decoded), sample.of(sent2), sample.of(g2))
    assert why is not None and "stale replay" in why
    # Taken as decoded, it would pass: the bf16 rounding of g2 hides it.
    assert guard.near_replay(sample.of(decoded), sample.of(g2), sample.of(g2)) is None
