"""The exchange object on its own: what one end sends, the other end receives, codec by codec."""

from __future__ import annotations

import itertools

import pytest
import torch

from fed_unimiss import exchange as ex
from fed_unimiss.exchange_codec import DOWN_CODECS, PACKED, TEACHER_MODES, UP_CODECS, CodecError
from fed_unimiss.exchange_config import ExchangeConfig
from fed_unimiss.exchange_link import Exchange, Payload

# Largest error of a decoded value, relative to the largest magnitude sent.
TOLERANCE = {"fp32": 0.0, "bf16": 2 ** -8, "fp16": 2 ** -11, "q8_delta": 2 / 254}


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"student.a": torch.randn(40, 9, generator=g),
            "teacher.a": torch.randn(40, 9, generator=g),
            ex.CENTER_KEY: torch.rand(1, 300, generator=g) - 0.5}


def _wire(payload: Payload) -> Payload:
    """The payload as the other end gets it: fresh arrays, nothing shared."""
    def copy(tensors):
        return None if tensors is None else {
            k: torch.from_numpy(v.numpy().copy()) for k, v in tensors.items()}
    return Payload(copy(payload.arrays), copy(payload.scales), dict(payload.config), payload.what)


def _close(got: torch.Tensor, want: torch.Tensor, codec: str, scale: float) -> None:
    assert got.dtype == torch.float32
    assert float((got - want).abs().max()) <= TOLERANCE[codec] * scale + 1e-6


@pytest.mark.parametrize("down,up,teacher",
                         list(itertools.product(DOWN_CODECS, UP_CODECS, TEACHER_MODES)))
def test_what_one_end_sends_the_other_receives(down, up, teacher):
    cfg = ExchangeConfig(down, up, teacher)
    aggregator, site = Exchange(cfg), Exchange(cfg)
    glob = _state(0)
    for rnd in range(3):  # the shared base: in full, then int8 changes of it
        travelling = aggregator.sent_keys(glob)
        assert (teacher == "local") == ("teacher.a" not in travelling)
        downlink = aggregator.send_state(glob)
        payload = downlink.for_node(site.base_digest)
        if down == "q8_delta":
            assert payload.what == ("base" if rnd == 0 else "delta")
        received = site.receive_state(_wire(payload))
        assert sorted(received) == sorted(travelling)
        assert site.base_digest == downlink.digest == aggregator.base_digest
        for name in travelling:  # within the codec's rounding of the state (or of its change)
            _close(received[name], glob[name], "bf16" if down == "q8_delta" else down,
                   float(glob[name].abs().max()))
        start = site.with_own_teacher(received)
        assert sorted(start) == sorted(glob)
        new = {k: v + 0.01 * (rnd + 1) * torch.ones_like(v) for k, v in start.items()}
        reply = site.send_update(new, start)
        assert (reply.scales is not None) == (up == "q8_delta")
        reference = {k: glob[k] for k in travelling}
        norms: dict[str, float] = {}
        decoded = dict(aggregator.receive_update(_wire(reply), reference, norms))
        assert sorted(decoded) == sorted(travelling)
        for name, value in decoded.items():
            if up == "q8_delta":  # the update, added to the aggregator's own global state
                want = reference[name] + (new[name] - received[name])
                _close(value, want, up, float((new[name] - received[name]).abs().max()))
                assert norms[name] > 0
            else:
                _close(value, new[name], up, float(new[name].abs().max()))
        glob = aggregator.checkpoint_state({**glob, **decoded})
        if teacher == "local":
            assert torch.equal(glob["teacher.a"], glob["student.a"])
            assert sorted(site.teacher) == ["teacher.a"]


def test_error_feedback_is_carried_into_the_next_update():
    cfg = ExchangeConfig("fp32", "q8_delta")
    site = Exchange(cfg)
    received = {"student.w": torch.zeros(1000)}
    true_total, sent_total = torch.zeros(1000), torch.zeros(1000)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        new = {"student.w": 1e-3 * torch.randn(1000, generator=g)}
        true_total += new["student.w"]
        decoded = dict(Exchange(cfg).receive_update(site.send_update(new, received), received))
        sent_total += decoded["student.w"]
    torch.testing.assert_close(sent_total + site.residual["student.w"], true_total,
                               rtol=0, atol=1e-6)


def test_an_evaluation_gets_the_state_in_full_and_leaves_the_base_alone():
    cfg = ExchangeConfig("q8_delta", "q8_delta")
    aggregator, site = Exchange(cfg), Exchange(cfg)
    glob = _state(2)
    site.receive_state(_wire(aggregator.send_state(glob).for_node(None)))
    held = site.base_digest
    evaluation = aggregator.send_state(_state(3), train=False).for_node(held)
    assert evaluation.config[ex.EXCHANGE_BASE_CODEC] == "bf16" and evaluation.what == "state"
    site.receive_state(_wire(evaluation), train=False)
    assert site.base_digest == held == aggregator.base_digest


def test_a_delta_for_a_base_not_held_does_not_decode_and_the_full_base_follows():
    cfg = ExchangeConfig("q8_delta", "fp32")
    aggregator, site = Exchange(cfg), Exchange(cfg)
    site.receive_state(_wire(aggregator.send_state(_state(4)).for_node(None)))
    held = site.base_digest
    site.forget_base()  # a restarted worker
    downlink = aggregator.send_state(_state(5))
    with pytest.raises(CodecError, match="does not hold"):
        site.receive_state(_wire(downlink.for_node(held)))
    assert site.base_digest is None
    site.receive_state(_wire(downlink.for_node(site.base_digest)))  # the full base
    assert site.base_digest == aggregator.base_digest
    assert [p.what for p in downlink.payloads()] == ["delta", "base"]


@pytest.mark.parametrize("up", UP_CODECS)
def test_an_update_that_does_not_fit_the_announced_codec_is_refused(up):
    cfg = ExchangeConfig("fp32", up)
    glob = _state(6)
    reply = Exchange(cfg).send_update({k: v + 1 for k, v in glob.items()}, glob)
    wrong = Payload(reply.arrays, None if reply.scales is not None else {PACKED: torch.ones(1)})
    with pytest.raises(CodecError, match="undecodable update: int8 scales"):
        list(Exchange(cfg).receive_update(wrong, glob))
    short = {k: v for k, v in glob.items() if k != ex.CENTER_KEY}
    with pytest.raises(CodecError):
        list(Exchange(cfg).receive_update(reply, short))


def test_received_sample_is_what_the_sites_decode():
    glob = _state(7)
    for down in DOWN_CODECS:
        aggregator, site = Exchange(ExchangeConfig(down)), Exchange(ExchangeConfig(down))
        downlink = aggregator.send_state(glob)
        received = site.receive_state(_wire(downlink.for_node(None)))
        sample = downlink.received_sample(lambda s: {k: v.double() for k, v in s.items()},
                                          glob)
        for name, value in received.items():
            assert torch.equal(sample[name], value.double()), (down, name)
