"""The round loop, strategy and run store against the in-process grid, with a toy ClientApp.

The ClientApp here is a real Flower ClientApp that answers with hand-made tensors, so the
aggregator side (push/poll, validation, dimension-aware folding, deadline, quorum, checkpoints,
resume) is tested exactly, without the cost of training. tests/federation/test_simulation.py runs
the real site ClientApp on phantom data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from aggregator.inprocess import InProcessGrid, SiteSpec, check_flower_version
from aggregator.rounds import FederationRun, RoundFailed, run_federation
from aggregator.run_store import ResumeError, RunStore
from fed_unimiss import exchange as ex
from fed_unimiss.checkpoint import load_checkpoint

NAMES = ["student.backbone.stem_3d.w", "student.backbone.stem_2d.w", "teacher.backbone.blk.w",
         "center"]
# site -> (samples_2d, samples_3d); CT only, X-ray only, both
COUNTS = {"ct": (16, 2), "xr": (4, 0), "both": (24, 3)}
OFFSET = {"ct": 1.0, "xr": 2.0, "both": 3.0}


def _initial() -> dict[str, torch.Tensor]:
    return {n: torch.arange(6, dtype=torch.float32).reshape(2, 3) * (i + 1)
            for i, n in enumerate(NAMES)}


def _toy_app(bad: dict[str, str] | None = None, bad_from: int = 1) -> ClientApp:
    """Each site adds OFFSET*round to every tensor; ``bad`` makes a site misbehave."""
    app = ClientApp()
    bad = bad or {}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        name = context.node_config[ex.NODE_SITE_NAME]
        rnd = int(msg.content.config_records[ex.CONFIG][ex.ROUND])
        state = msg.content.array_records[ex.ARRAYS].to_torch_state_dict()
        state = {k: v + OFFSET[name] * rnd for k, v in state.items()}
        kind = bad.get(name) if rnd >= bad_from else None
        if kind == "nan":
            state["center"][0, 0] = float("nan")
        elif kind == "shape":
            state["center"] = torch.zeros(3, 3)
        elif kind == "missing":
            del state["teacher.backbone.blk.w"]
        s2, s3 = COUNTS[name]
        return Message(RecordDict({
            ex.ARRAYS: ArrayRecord(state),
            ex.METRICS: MetricRecord({ex.SAMPLES_2D: s2, ex.SAMPLES_3D: s3, ex.LOSS: float(s2)}),
            ex.SITE: ConfigRecord({ex.SITE_NAME_KEY: name}),
        }), reply_to=msg)

    return app


def _config(tmp: Path, **fields) -> Path:
    # The toy sites add constants, not Adam steps: the recipe's Adam bound does not apply to them.
    body = {"recipe": {"ssl": {"steps_per_epoch": 1}}, "local_steps": 2, "min_sites": 2, "round_timeout": 30,
            "evaluate": False, "poll_interval": 0.01, "max_update_norm": 1.0e4, **fields}
    path = tmp / "fed.yaml"
    tmp.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def _run(tmp: Path, app: ClientApp, rounds: int = 2, resume: bool = False,
         sites=("ct", "xr", "both"), grid_cls=InProcessGrid, **fields):
    grid = grid_cls(app, [SiteSpec(s, tmp) for s in sites], tmp / "sites")
    run = FederationRun.from_files(_config(tmp, **fields), tmp / "run", rounds)
    return run_federation(grid, run, resume=resume, initial=_initial())


def _expected(prev: dict[str, torch.Tensor], rnd: int, sites) -> dict[str, torch.Tensor]:
    """Dimension-aware weighted mean, recomputed independently of aggregator/averaging.py."""
    out = {}
    for name, value in prev.items():
        kind = "3d" if "_3d" in name else "2d" if "_2d" in name else "shared"
        num, den = torch.zeros_like(value, dtype=torch.float64), 0.0
        for s in sites:
            s2, s3 = COUNTS[s]
            w = {"3d": s3, "2d": s2, "shared": s2 + s3}[kind]
            num += w * (value.double() + OFFSET[s] * rnd)
            den += w
        out[name] = (num / den).float() if den else value
    return out


def test_two_rounds_average_checkpoint_and_log(tmp_path):
    row = _run(tmp_path, _toy_app())
    expected = _initial()
    store = RunStore(tmp_path / "run")
    for rnd in (1, 2):
        expected = _expected(expected, rnd, COUNTS)
        state, meta = load_checkpoint(tmp_path / "run" / f"global_round_{rnd:04d}.safetensors")
        for name in NAMES:
            torch.testing.assert_close(state[name], expected[name])
        assert meta["round"] == rnd and meta["round_log"]["sites"] == ["both", "ct", "xr"]
    rows = store.read_rounds()
    assert [r["round"] for r in rows] == [1, 2] and rows[-1] == row
    assert row["loss"] == pytest.approx((16 * 18 + 4 * 4 + 24 * 27) / (18 + 4 + 27))
    assert row["per_site"]["ct"][ex.SAMPLES_3D] == 2 and row["rejected"] == {}
    # the X-ray-only site never moved the 3D tensor: its value is the CT sites' mean only
    assert not any(f.name.endswith(".tmp") for f in (tmp_path / "run").iterdir())


@pytest.mark.parametrize("kind, reason", [("nan", "non-finite"), ("shape", "shape"),
                                          ("missing", "missing")])
def test_bad_reply_is_dropped_and_round_completes(tmp_path, kind, reason):
    row = _run(tmp_path, _toy_app({"xr": kind}), rounds=1)
    assert row["sites"] == ["both", "ct"]
    assert reason in row["rejected"]["xr"]
    state, _ = load_checkpoint(tmp_path / "run" / "global_round_0001.safetensors")
    expected = _expected(_initial(), 1, ["ct", "both"])
    for name in NAMES:
        assert torch.isfinite(state[name]).all()
        torch.testing.assert_close(state[name], expected[name])


class _SilentGrid(InProcessGrid):
    """A transport where node 2 ("xr") never answers, as if its SuperNode had died."""

    def deliver(self, msg):
        return None if msg.metadata.dst_node_id == 2 else super().deliver(msg)


def test_missing_site_closes_at_deadline_with_quorum(tmp_path):
    row = _run(tmp_path, _toy_app(), rounds=1, grid_cls=_SilentGrid, round_timeout=0.5)
    assert row["sites"] == ["both", "ct"] and row["missing_nodes"] == [2]


def test_round_names_the_registered_sites_it_heard_nothing_from(tmp_path):
    """"late" is registered but never connected, "xr" is connected but silent: both are absent;
    "ct" replied with a bad update: it is rejected, not absent."""
    grid = _SilentGrid(_toy_app({"ct": "nan"}), [SiteSpec(s, tmp_path) for s in
                                                 ("ct", "xr", "both")], tmp_path / "sites")
    run = FederationRun.from_files(_config(tmp_path, round_timeout=0.5, min_sites=1),
                                   tmp_path / "run", 1)
    row = run_federation(grid, run, initial=_initial(),
                         registered=["both", "ct", "late", "xr"])
    assert row["sites"] == ["both"] and "ct" in row["rejected"]
    assert row["absent"] == ["late", "xr"]
    assert RunStore(tmp_path / "run").read_rounds()[-1]["absent"] == ["late", "xr"]


def test_round_without_quorum_fails_clearly_and_keeps_checkpoints(tmp_path):
    app = _toy_app({"xr": "nan", "both": "nan"}, bad_from=2)
    with pytest.raises(RoundFailed, match=r"round 2: 1 valid replie\(s\) from 3 site\(s\).*min_sites=2"):
        _run(tmp_path, app, rounds=2)
    store = RunStore(tmp_path / "run")
    assert store.latest()[0] == 1 and [r["round"] for r in store.read_rounds()] == [1]


class _CrashingGrid(InProcessGrid):
    """The coordinator 'crashes' when round 2 starts (after round 1 was checkpointed)."""

    def push_messages(self, messages):
        messages = list(messages)
        if messages and messages[0].metadata.group_id == "2":
            raise KeyboardInterrupt("simulated crash")
        return super().push_messages(messages)


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    _run(tmp_path / "full", _toy_app())
    (tmp_path / "crash").mkdir()
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "crash", _toy_app(), grid_cls=_CrashingGrid)
    assert RunStore(tmp_path / "crash" / "run").latest()[0] == 1
    with pytest.raises(ResumeError, match="pass --resume"):
        _run(tmp_path / "crash", _toy_app())
    with pytest.raises(ResumeError, match="different configuration.*local_steps"):
        _run(tmp_path / "crash", _toy_app(), resume=True, local_steps=3)
    _run(tmp_path / "crash", _toy_app(), resume=True)
    a, _ = load_checkpoint(tmp_path / "full" / "run" / "global_round_0002.safetensors")
    b, _ = load_checkpoint(tmp_path / "crash" / "run" / "global_round_0002.safetensors")
    for name in NAMES:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    rows = RunStore(tmp_path / "crash" / "run").read_rounds()
    assert [r["round"] for r in rows] == [1, 2]


def test_rounds_log_repaired_on_resume(tmp_path):
    _run(tmp_path, _toy_app(), rounds=2)
    log = tmp_path / "run" / "rounds.jsonl"
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\n")  # crash after checkpoint 2, before its log line
    _run(tmp_path, _toy_app(), rounds=2, resume=True)
    assert [json.loads(x)["round"] for x in log.read_text().splitlines()] == [1, 2]


def test_flower_version_pin():
    check_flower_version()
    with pytest.raises(RuntimeError, match="written for flwr 1.39.x.*found flwr 1.40.0"):
        check_flower_version("1.40.0")


def test_recipe_without_steps_per_epoch_is_refused(tmp_path):
    with pytest.raises(Exception, match="steps_per_epoch must be set for a federation"):
        FederationRun.from_files(_config(tmp_path, recipe={}), tmp_path / "run", 1)
