"""The compressed exchange, end to end in process and codec by codec.

The federation below runs bf16 down, int8 deltas up with error feedback and a site-local teacher,
on real phantom sites through the real ServerApp and ClientApp. A tap on the transport records
what crossed the wire; the test decodes the replies on its own and recomputes the new global
state, checks that only student/center tensors, their int8 scales and numbers travelled, that a
reply that does not decode is rejected with a reason, and that checkpoints stay fp32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from federation_helpers import expected_mean, micro_federation
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from aggregator.inprocess import InProcessGrid, SiteSpec
from aggregator.simulate_cli import simulate
from fed_unimiss import exchange as ex
from fed_unimiss import exchange_codec as codec
from fed_unimiss.checkpoint import load_checkpoint
from fed_unimiss.config import ConfigError
from fed_unimiss.federation import load_federation
from site_client.client_app import app
from site_client.errors import ERROR_EXCHANGE

REPO = Path(__file__).resolve().parents[2]
EXCHANGE = {"down": "bf16", "up": "q8_delta", "teacher": "local"}


# ---------------------------------------------------------------- codecs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int8_blocks_round_trip_within_half_a_step(seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(3, 700, generator=g) * torch.logspace(-4, 1, 700)
    q, scales = codec.quantise(t)
    assert q.dtype == torch.int8 and q.numel() == codec.BLOCK * scales.numel()
    back = codec.dequantise(q, scales, tuple(t.shape))
    per_block = scales.repeat_interleave(codec.BLOCK)[: t.numel()].view(t.shape)
    assert ((back - t).abs() <= per_block / 2 + 1e-7).all()


def test_error_feedback_loses_nothing_over_rounds():
    """Sum of what was sent + the residual kept = sum of the true updates."""
    g = torch.Generator().manual_seed(3)
    received = {"student.w": torch.zeros(1000)}
    residual: dict[str, torch.Tensor] = {}
    sent_total = torch.zeros(1000)
    true_total = torch.zeros(1000)
    for _ in range(5):
        new = {"student.w": torch.randn(1000, generator=g) * 1e-3}
        true_total += new["student.w"]
        wire, scales = codec.encode_update(new, received, "q8_delta", ["student.w"], residual)
        sent_total += codec.decode_update_tensor("student.w", wire["student.w"],
                                                 scales["student.w"], "q8_delta",
                                                 torch.zeros(1000))
    torch.testing.assert_close(sent_total + residual["student.w"], true_total, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["bf16", "fp16", "fp32"])
def test_half_precision_transport_round_trip(name):
    t = torch.randn(5, 7)
    wire = codec.encode_tensor(t, name)
    back = codec.decode_tensor("x", wire, name, (5, 7))
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, t, rtol={"bf16": 1e-2, "fp16": 1e-3, "fp32": 0}[name],
                               atol=0)


def test_undecodable_updates_raise_with_a_reason():
    ref = torch.zeros(300)
    q, s = codec.quantise(torch.randn(300))
    with pytest.raises(codec.CodecError, match="scales missing"):
        codec.decode_update_tensor("w", q, None, "q8_delta", ref)
    with pytest.raises(codec.CodecError, match="expected int8"):
        codec.decode_update_tensor("w", q.float(), s, "q8_delta", ref)
    with pytest.raises(codec.CodecError, match="float32 scales of shape"):
        codec.decode_update_tensor("w", q, s[:1], "q8_delta", ref)
    with pytest.raises(codec.CodecError, match="not finite"):
        codec.decode_update_tensor("w", q, torch.full_like(s, float("nan")), "q8_delta", ref)
    with pytest.raises(codec.CodecError, match="dtype"):
        codec.decode_tensor("w", torch.zeros(300), "bf16", (300,))


def test_packed_payloads_round_trip_and_refuse_wrong_lengths():
    g = torch.Generator().manual_seed(5)
    ref = {"student.b": torch.randn(3, generator=g), "center": torch.randn(1, 7, generator=g),
           "student.a": torch.randn(300, 2, generator=g)}
    items = codec.layout(ref, ref)
    assert [n for n, _ in items] == sorted(ref)
    assert codec.layout_from_json(codec.layout_to_json(items)) == items
    back = codec.unpack_state(codec.pack_state(ref, items, "bf16"), items, "bf16")
    for k in ref:
        torch.testing.assert_close(back[k], ref[k], rtol=1e-2, atol=0)
    new = {k: v + 0.01 for k, v in ref.items()}
    values, scales = codec.pack_update(new, ref, "q8_delta", items)
    decoded = dict(codec.unpack_update(values, scales, "q8_delta", ref))
    for k in ref:
        torch.testing.assert_close(decoded[k], new[k], rtol=0, atol=1e-4)
    with pytest.raises(codec.CodecError, match="expected torch.int8 of"):
        list(codec.unpack_update(values[:-1], scales, "q8_delta", ref))
    with pytest.raises(codec.CodecError, match="scales"):
        list(codec.unpack_update(values, scales[:-1], "q8_delta", ref))
    with pytest.raises(codec.CodecError, match="packed bf16 payload"):
        codec.unpack_state(torch.zeros(5, dtype=torch.int16), items, "bf16")


def test_exchange_config_errors_name_the_field(tmp_path):
    path = tmp_path / "fed.yaml"
    path.write_text(json.dumps({"exchange": {"up": "zstd"}}))
    with pytest.raises(ConfigError, match=r"exchange: up: 'zstd'"):
        load_federation(path)
    path.write_text(json.dumps({"exchange": {"teacher": "rebuilt"}}))
    with pytest.raises(ConfigError, match=r"exchange: teacher"):
        load_federation(path)


def test_shipped_federation_configs_use_a_valid_exchange():
    for path in sorted((REPO / "configs" / "federation").glob("*.yaml")):
        load_federation(path).exchange.validate()


def test_site_refuses_an_exchange_it_cannot_honour(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    grid = InProcessGrid(app, [SiteSpec("A", data)], tmp_path / "state")
    config = ConfigRecord({ex.RECIPE_JSON: json.dumps({}), ex.ROUND: 1, ex.LOCAL_STEPS: 1,
                           ex.START_STEP: 0, ex.TOTAL_STEPS: 1, ex.EVAL_BATCHES: 1,
                           ex.EXCHANGE_UP: "zstd"})
    msg = Message(RecordDict({ex.ARRAYS: ArrayRecord({"center": torch.zeros(1, 4)}),
                              ex.CONFIG: config}), 1, ex.TRAIN, group_id="1")
    grid.push_messages([msg])
    reply = app(msg, grid.contexts[1])
    assert reply.has_error() and reply.error.code == ERROR_EXCHANGE


# ---------------------------------------------------------------- in-process federation




class TapGrid(InProcessGrid):
    """Records instructions and replies; breaks the X-ray site's round-2 scales."""

    log: list[tuple[Message, Message | None]] = []

    def deliver(self, msg):
        reply = super().deliver(msg)
        if msg.metadata.message_type == ex.TRAIN and msg.metadata.group_id == "2" \
                and msg.metadata.dst_node_id == 2 and not reply.has_error():
            scales = torch.from_numpy(reply.content.array_records[ex.SCALES][codec.PACKED].numpy())
            # one block's scale short: does not decode
            reply.content[ex.SCALES] = ArrayRecord({codec.PACKED: scales[:-1].clone()})
        TapGrid.log.append((msg, reply))
        return reply


@pytest.fixture(scope="module")
def compressed(phantom_sites, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compressed")
    config = micro_federation(tmp / "federation.yaml", exchange=EXCHANGE)
    TapGrid.log = []
    simulate(config, list(phantom_sites.items()), rounds=2, out=tmp / "run", grid_cls=TapGrid)
    return tmp, list(TapGrid.log)


@pytest.mark.slow
def test_compressed_round_is_the_average_of_the_decoded_updates(compressed):
    tmp, log = compressed
    rows = [json.loads(x) for x in (tmp / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["sites"] == ["both", "ct", "xr"]
    assert "undecodable" in rows[1]["rejected"]["xr"] and rows[1]["sites"] == ["both", "ct"]
    for row in rows:
        assert row["exchange"] == "down=bf16 up=q8_delta teacher=local"
        assert set(row["bytes_up"]) == {"both", "ct", "xr"} == set(row["bytes_down"])
        assert set(row["site_seconds"]) >= set(row["sites"])
        assert isinstance(row["seconds"], float)
    for rnd in (1, 2):
        train = [(m, r) for m, r in log if m.metadata.message_type == ex.TRAIN
                 and m.metadata.group_id == str(rnd)]
        got, meta = load_checkpoint(tmp / "run" / f"global_round_{rnd:04d}.safetensors")
        base, _ = (load_checkpoint(tmp / "run" / f"global_round_{rnd - 1:04d}.safetensors")
                   if rnd > 1 else (None, None))
        msg0 = train[0][0]
        items = codec.layout_from_json(msg0.content.config_records[ex.CONFIG][ex.EXCHANGE_LAYOUT])
        sent = codec.unpack_state(torch.from_numpy(
            msg0.content.array_records[ex.ARRAYS][codec.PACKED].numpy()), items, "bf16")
        if base is None:  # round 1: the fp32 global is the bf16 one we saw, up to rounding
            base = sent
            tol = 1e-2
        else:
            tol = 1e-5
        replies = []
        for _, reply in train:
            content = reply.content
            scales = content.array_records[ex.SCALES]
            arrays = content.array_records[ex.ARRAYS]
            m = content.metric_records[ex.METRICS]
            label = content.config_records[ex.SITE][ex.SITE_NAME_KEY]
            if rnd == 2 and label == "xr":
                continue  # rejected above
            values = torch.from_numpy(arrays[codec.PACKED].numpy())
            blocks = torch.from_numpy(scales[codec.PACKED].numpy())
            state, start, first = {}, 0, 0
            for name, shape in items:  # our own unpacking of the layout, block by block
                nb = -(-math.prod(shape) // codec.BLOCK)
                delta = codec.dequantise(values[start:start + nb * codec.BLOCK],
                                         blocks[first:first + nb], shape)
                state[name] = base[name] + delta
                start, first = start + nb * codec.BLOCK, first + nb
            assert start == values.numel() and first == blocks.numel()
            replies.append((state, m[ex.SAMPLES_2D], m[ex.SAMPLES_3D]))
        expected = expected_mean({k: base[k] for k in sent}, replies)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=tol, atol=tol * 1e-2)
            assert got[name].dtype == torch.float32
        # the checkpoint's teacher is the new global student (teacher: local)
        for name in got:
            if name.startswith(ex.TEACHER_PREFIX):
                student = ex.STUDENT_PREFIX + name[len(ex.TEACHER_PREFIX):]
                assert torch.equal(got[name], got[student])
        assert meta["round"] == rnd


@pytest.mark.slow
def test_compressed_wire_holds_only_student_center_scales_and_numbers(compressed):
    _, log = compressed
    assert log
    for msg, reply in log:
        if msg.metadata.message_type == ex.QUERY:  # the run's last word to the tampered site:
            # its own verdict, no state; answered by an empty record
            assert not msg.content.array_records and set(msg.content.config_records[ex.CONFIG]) \
                == {ex.VERDICT_ROUND, ex.VERDICT_ACTION, ex.VERDICT_REASON}
            assert not (reply.content.array_records or reply.content.metric_records
                        or reply.content.config_records)
            continue
        sent = msg.content.array_records[ex.ARRAYS]
        assert list(sent.keys()) == [codec.PACKED] and sent[codec.PACKED].dtype == "int16"
        config = msg.content.config_records[ex.CONFIG]
        assert {config[k] for k in codec.CONFIG_KEYS} == set(EXCHANGE.values())
        items = codec.layout_from_json(config[ex.EXCHANGE_LAYOUT])
        names = [name for name, _ in items]
        assert names and all(n.startswith(ex.STUDENT_PREFIX) or n == ex.CENTER_KEY
                             for n in names)  # no teacher with teacher: local
        assert sent[codec.PACKED].shape == [sum(math.prod(s) for _, s in items)] or \
            tuple(sent[codec.PACKED].shape) == (sum(math.prod(s) for _, s in items),)
        assert reply is not None and not reply.has_error()
        content = reply.content
        assert set(content.config_records) <= {ex.SITE}
        for record in content.config_records.values():
            assert dict(record) == {ex.SITE_NAME_KEY: record[ex.SITE_NAME_KEY]}
        assert set(content.metric_records) == {ex.METRICS}
        for key, value in content.metric_records[ex.METRICS].items():
            assert isinstance(value, (int, float)) and not isinstance(value, bool), key
        if msg.metadata.message_type == ex.TRAIN:
            assert set(content.array_records) == {ex.ARRAYS, ex.SCALES}
            arrays, scales = content.array_records[ex.ARRAYS], content.array_records[ex.SCALES]
            assert list(arrays.keys()) == [codec.PACKED] == list(scales.keys())
            # exactly the int8 blocks and one scale per block of the announced tensors
            blocks = sum(-(-math.prod(s) // codec.BLOCK) for _, s in items)
            assert arrays[codec.PACKED].dtype == "int8"
            assert tuple(arrays[codec.PACKED].shape) == (blocks * codec.BLOCK,)
            assert scales[codec.PACKED].dtype == "float32"
            tampered = msg.metadata.group_id == "2" and msg.metadata.dst_node_id == 2
            assert tuple(scales[codec.PACKED].shape) == (blocks - tampered,)
        else:
            assert set(content.array_records) == set()


@pytest.mark.slow
def test_status_shows_each_rounds_cost(compressed, capsys):
    from aggregator.cli import _status

    tmp, _ = compressed

    class Args:
        out, kit, json = str(tmp / "run"), None, False

    assert _status(Args()) == 0
    text = capsys.readouterr().out
    assert "round costs (exchange down=bf16 up=q8_delta teacher=local" in text
    for rnd in (1, 2):
        line = next(x for x in text.splitlines()
                    if x.strip().startswith(f"round {rnd}: ") and " MB / " in x)
        assert all(f"{site} " in line for site in ("both", "ct", "xr")), line
        assert " s " in line


# Why each attack is rejected when its reply travels as int8 deltas (round 1, round 2).
INT8_REASONS = {
    "replace": ("exceeds max_update_norm",) * 2,
    "inflate": ("above the round's bound",) * 2,
    "signflip": ("points against the other replies' median update",) * 2,
    "noise": ("outside [-1.05, 1.05]",) * 2,
    "nan": ("undecodable",) * 2,
    # round 1: nothing trained; round 2: round 1's state re-encoded as int8 against round 2's,
    # new bytes but next to it (aggregator/replays.py)
    "stale": ("identical to the global state sent", "away from the global state sent in round 1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("down", ["bf16", "q8_delta"])
def test_attacks_are_encoded_as_announced_and_still_rejected(phantom_sites, tmp_path, down):
    """simulate --attack under the compressed exchanges (q8_delta both ways is what the shipped
    configs use): the attacker decodes what it was sent as its honest client does, and its
    int8 reply is rejected every round as under fp32 (tests/federation/test_attacks.py)."""
    from fed_unimiss.data.phantom import write_phantoms

    write_phantoms(tmp_path / "attacker", n_ct=1, n_xray=3, seed=4)
    config = micro_federation(tmp_path / "federation.yaml", evaluate=False,
                              exchange={"down": down, "up": "q8_delta"})
    sites = {**phantom_sites, "M": tmp_path / "attacker"}
    kinds = list(INT8_REASONS) if down == "q8_delta" else ["signflip", "nan", "stale"]
    for kind in kinds:
        out = tmp_path / kind
        simulate(config, list(sites.items()), rounds=2, out=out, attacks={"M": kind})
        rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
        for row, check in zip(rows, INT8_REASONS[kind], strict=True):
            assert row["sites"] == ["both", "ct", "xr"], (kind, row["decisions"]["M"])
            assert check in row["rejected"]["M"], (kind, row["rejected"])


# ---------------------------------------------------------------- down: int8 deltas of a base


def test_base_advances_to_the_same_bits_on_both_sides_and_trails_the_global():
    g = torch.Generator().manual_seed(7)
    glob = {"student.a": torch.randn(300, 5, generator=g), "center": torch.rand(1, 70, generator=g)}
    items = codec.layout(glob, glob)
    base = {k: codec.bf16_round(v) for k, v in glob.items()}
    first = codec.base_from_bits(codec.base_bits(base, items, "bf16"), items, "bf16")
    assert codec.base_digest(first, items) == codec.base_digest(base, items)  # bf16 is exact
    for _ in range(4):
        glob = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in glob.items()}
        values, scales = codec.base_delta(glob, base, items)
        wire_v, wire_s = values.numpy().copy(), scales.numpy().copy()  # what a site receives
        ours = codec.advance_base(base, values, scales, items)
        theirs = codec.advance_base(base, torch.from_numpy(wire_v), torch.from_numpy(wire_s), items)
        assert codec.base_digest(ours, items) == codec.base_digest(theirs, items)
        kept = {k: v.clone() for k, v in base.items()}  # the aggregator's way: in place
        again = codec.base_delta(glob, kept, items, advance=True)
        assert torch.equal(again[0], values) and torch.equal(again[1], scales)
        assert codec.base_digest(kept, items) == codec.base_digest(ours, items)
        for name, _ in items:  # within half an int8 step of the delta: error feedback
            assert (ours[name] - glob[name]).abs().max() <= scales.max() / 2 + 1e-7, name
        base = ours
    assert all(v.dtype == torch.float32 for v in base.values())
    back = codec.base_from_bits(codec.base_bits(base, items, "fp32"), items, "fp32")
    assert codec.base_digest(back, items) == codec.base_digest(base, items)
    lossy = codec.base_from_bits(codec.base_bits(base, items, "bf16"), items, "bf16")
    assert codec.base_digest(lossy, items) != codec.base_digest(base, items)  # why fp32 later
    with pytest.raises(codec.CodecError, match="packed q8_delta update"):
        codec.advance_base(base, values[:-1], scales, items)
    with pytest.raises(codec.CodecError, match="a base travels as bf16 or fp32"):
        codec.base_from_bits(back["center"].reshape(-1), items, "fp16")


class BaseTapGrid(InProcessGrid):
    """Records train instructions and replies; site ct loses its base before round 2."""

    log: list[tuple[Message, Message]] = []

    def deliver(self, msg):
        from site_client.client_app import in_process_sessions

        if msg.metadata.message_type == ex.TRAIN and msg.metadata.group_id == "2" \
                and msg.metadata.dst_node_id == 1:
            for session in in_process_sessions().sessions.values():  # a restarted worker
                if session.state_dir.name == "ct":  # remembers nothing
                    session.exchange.forget_base()
        reply = super().deliver(msg)
        if msg.metadata.message_type == ex.TRAIN:
            BaseTapGrid.log.append((msg, reply))
        return reply


@pytest.mark.slow
def test_down_deltas_reach_sites_holding_the_base_and_the_full_base_reaches_the_rest(
        phantom_sites, tmp_path):
    exchange = {"down": "q8_delta", "up": "q8_delta", "teacher": "exchanged"}
    config = micro_federation(tmp_path / "federation.yaml", exchange=exchange)
    BaseTapGrid.log = []
    simulate(config, list(phantom_sites.items()), rounds=3, out=tmp_path / "run",
             grid_cls=BaseTapGrid)
    rows = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["sites"] for r in rows] == [["both", "ct", "xr"], ["both", "xr"],
                                          ["both", "ct", "xr"]]
    assert f"code {ERROR_EXCHANGE}" in rows[1]["rejected"]["ct"]
    for row in rows:  # evaluation gets the state in full and leaves the bases alone
        assert set(row["eval_per_site"]) == {"both", "ct", "xr"}
    fp32 = sum(4 * v.numel() for v in load_checkpoint(
        tmp_path / "run" / "global_round_0001.safetensors")[0].values())
    kinds = {}
    base: dict[str, torch.Tensor] = {}
    for msg, reply in BaseTapGrid.log:
        rnd, node = int(msg.metadata.group_id), msg.metadata.dst_node_id
        config = msg.content.config_records[ex.CONFIG]
        arrays = msg.content.array_records[ex.ARRAYS]
        items = codec.layout_from_json(config[ex.EXCHANGE_LAYOUT])
        flat = torch.from_numpy(arrays[codec.PACKED].numpy())
        if ex.EXCHANGE_BASE_PREV in config:
            kinds[rnd, node] = "delta"
            assert config[ex.EXCHANGE_BASE_PREV] == codec.base_digest(base, items)
            got = codec.advance_base(
                base, flat, torch.from_numpy(arrays[codec.PACKED_SCALES].numpy()), items)
        else:
            kinds[rnd, node] = "full"
            assert config[ex.EXCHANGE_BASE_CODEC] == ("bf16" if rnd == 1 else "fp32")
            got = codec.base_from_bits(flat, items, config[ex.EXCHANGE_BASE_CODEC])
        assert codec.base_digest(got, items) == config[ex.EXCHANGE_BASE]
        if node == 3:  # 'both' holds every base: follow the bases it was sent
            base = got
            if rnd > 1:  # the base trails the last global by half an int8 step of the change
                glob, _ = load_checkpoint(tmp_path / "run" / f"global_round_{rnd - 1:04d}.safetensors")
                scales = torch.from_numpy(arrays[codec.PACKED_SCALES].numpy())
                worst = max(float((got[name] - glob[name]).abs().max()) for name, _ in items)
                assert worst <= float(scales.max()) / 2 + 1e-6
        assert reply.has_error() == (rnd == 2 and node == 1)
    assert kinds == {(1, 1): "full", (1, 2): "full", (1, 3): "full",
                     (2, 1): "delta", (2, 2): "delta", (2, 3): "delta",
                     (3, 1): "full", (3, 2): "delta", (3, 3): "delta"}
    # int8 down: a quarter of fp32 (+ one scale per 256 values); the first base half of fp32,
    # a later full base (ct, after it lost its base) all of it
    assert 0.49 * fp32 < rows[0]["bytes_down"]["xr"] < 0.51 * fp32
    assert rows[1]["bytes_down"]["xr"] < 0.27 * fp32
    assert 0.99 * fp32 < rows[2]["bytes_down"]["ct"] < 1.01 * fp32
    assert rows[2]["bytes_down"]["xr"] < 0.27 * fp32
