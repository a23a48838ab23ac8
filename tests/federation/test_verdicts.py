"""A site hears what the coordinator did with its update, and why, and nothing of other sites.

The aggregator side runs the real round loop and strategy against the in-process grid with the
toy ClientApp of test_rounds.py (hand-made replies: no training); the site side is the real site
ClientApp answering the run's last message, and the line ``site start`` prints from it. The
end-to-end case (a DP site's update rejected by plan, in the real site code) is in
tests/privacy/test_dp_plan.py.
"""

from __future__ import annotations

import json
import logging

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from test_rounds import _run, _toy_app

from aggregator.inprocess import InProcessGrid, SiteSpec
from aggregator.rounds import RoundFailed
from aggregator.screening import REJECTED, screen_round
from aggregator.server_app import quiet_stopped_runs
from aggregator.verdicts import SiteVerdict, last_word_messages
from fed_unimiss import exchange as ex
from site_client.client_app import app as site_app
from site_client.supernode import format_event


class _RecordingGrid(InProcessGrid):
    """The in-process transport, keeping (message type, node id, config) of every message."""

    sent: list[tuple[str, int, dict]] = []

    def deliver(self, msg):
        config = msg.content.config_records.get(ex.CONFIG)
        type(self).sent.append((msg.metadata.message_type, msg.metadata.dst_node_id,
                                dict(config) if config is not None else {}))
        return super().deliver(msg)


def _verdict(config: dict) -> tuple:
    return (config.get(ex.VERDICT_ROUND), config.get(ex.VERDICT_ACTION),
            config.get(ex.VERDICT_REASON))


def test_each_site_hears_its_own_decision_in_the_next_instruction_and_at_the_end(tmp_path):
    _RecordingGrid.sent = []
    _run(tmp_path, _toy_app({"xr": "nan"}), rounds=2, grid_cls=_RecordingGrid)
    train = {(cfg[ex.ROUND], node): cfg for kind, node, cfg in _RecordingGrid.sent
             if kind == ex.TRAIN}
    # round 1: nothing decided yet
    assert all(ex.VERDICT_ACTION not in cfg for (rnd, _), cfg in train.items() if rnd == 1)
    # round 2: node 2 (xr) hears that its round-1 update was rejected, with the check's reason
    rnd, action, reason = _verdict(train[(2, 2)])
    assert (rnd, action) == (1, "rejected") and "non-finite" in reason
    assert "ct" not in reason and "both" not in reason  # no other site's label
    assert _verdict(train[(2, 1)]) == (1, "accepted", None)  # ct: folded, nothing to explain
    # the run ended after round 2: only the rejected site gets a last message, with round 2
    last = [(node, cfg) for kind, node, cfg in _RecordingGrid.sent if kind == ex.QUERY]
    assert [node for node, _ in last] == [2]
    assert _verdict(last[0][1])[:2] == (2, "rejected")


def test_a_failed_round_still_tells_the_rejected_sites(tmp_path):
    _RecordingGrid.sent = []
    with pytest.raises(RoundFailed, match="0 valid replie"):
        _run(tmp_path, _toy_app({"xr": "shape"}), rounds=1, sites=("xr",),
             grid_cls=_RecordingGrid, min_sites=1)
    last = [cfg for kind, _node, cfg in _RecordingGrid.sent if kind == ex.QUERY]
    assert len(last) == 1 and _verdict(last[0])[:2] == (1, "rejected")
    assert "shape" in last[0][ex.VERDICT_REASON]


def test_a_round_relative_rejection_hides_the_round_median():
    norms = {"A": {"student": 1.0, "teacher": 0.1, "center": 0.0},
             "B": {"student": 1.2, "teacher": 0.12, "center": 0.0},
             "C": {"student": 9.0, "teacher": 0.11, "center": 0.0}}
    _, verdicts = screen_round(norms, {}, {}, norm_factor=5.0, min_cosine=None,
                               clip_to_median=False)
    c = verdicts["C"]
    assert c.action == REJECTED
    assert "the round median 1.2" in c.reason  # the coordinator's record has the median ...
    assert "9 is above norm_factor 5" in c.site_reason  # ... the site its own norm and the rule
    assert "1.2" not in c.site_reason and "1.8" not in c.site_reason  # no median, no ratio


def test_site_says_a_rejection_on_its_terminal_and_in_its_log(tmp_path, caplog):
    grid = InProcessGrid(site_app, [SiteSpec("A", tmp_path)], tmp_path / "state")
    messages = last_word_messages({1: SiteVerdict(3, "rejected", "count samples_2d 68 above the "
                                                  "round's bound 48 (DP plan: ...)"),
                                   2: SiteVerdict(3, "accepted")})
    assert len(messages) == 1  # an accepted update needs no last word
    grid.push_messages(messages)
    with caplog.at_level(logging.WARNING):
        reply = site_app(messages[0], grid.contexts[1])
    assert not reply.has_error() and not reply.content.array_records  # nothing trained or sent
    events = [json.loads(line) for line in
              (tmp_path / "state" / "A" / "progress.jsonl").read_text().splitlines()]
    assert events == [{"round": 3, "event": "rejected",
                       "why": "count samples_2d 68 above the round's bound 48 (DP plan: ...)"}]
    assert format_event("A", events[0]) == (
        "site A: round 3: update REJECTED by the coordinator: count samples_2d 68 above the "
        "round's bound 48 (DP plan: ...)")
    assert "round 3: the coordinator REJECTED this site's update: count samples_2d 68" \
        in caplog.text


def test_site_ignores_a_verdict_it_cannot_read(tmp_path):
    grid = InProcessGrid(site_app, [SiteSpec("A", tmp_path)], tmp_path / "state")
    msg = Message(RecordDict({ex.CONFIG: ConfigRecord({ex.VERDICT_ROUND: "one",
                                                       ex.VERDICT_ACTION: "rejected"})}),
                  1, ex.QUERY, group_id="x")
    grid.push_messages([msg])
    assert not site_app(msg, grid.contexts[1]).has_error()
    assert not (tmp_path / "state" / "A" / "progress.jsonl").exists()


def test_a_failed_quorum_is_one_line_in_flowers_log_not_a_traceback():
    from flwr.supercore.logger import FLOWER_LOGGER, log

    quiet_stopped_runs()
    quiet_stopped_runs()  # once per process, however often main runs
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    FLOWER_LOGGER.addHandler(handler)
    try:
        try:
            raise RoundFailed("round 2: 0 valid replie(s) from 1 site(s); Rejected replies: A: x")
        except RoundFailed as e:  # as flwr-serverapp logs what leaves the ServerApp
            log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=e)
        try:
            raise ValueError("a real bug")
        except ValueError as e:
            log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=e)
    finally:
        FLOWER_LOGGER.removeHandler(handler)
    stopped, bug = records[-2:]
    text = logging.Formatter().format(stopped)
    assert text == ("ServerApp stopped the run: round 2: 0 valid replie(s) from 1 site(s); "
                    "Rejected replies: A: x")
    assert "Traceback" not in text
    assert "Traceback" in logging.Formatter().format(bug)  # a bug keeps its traceback
    assert sum(1 for f in FLOWER_LOGGER.filters if type(f).__name__ == "StoppedRunOneLine") == 1
