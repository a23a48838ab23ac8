"""The replay checks outlive an aggregator restart: what they remember is written with the run.

Site M's accepted reply of round 1 is kept; the aggregator dies at the start of round 3 (after
round 2's checkpoint), the run is resumed, and in the resumed round 3 M sends its round-1 reply
again, byte for byte. The resumed aggregator must reject it as the replay it is, naming round
1, which only the run folder can have told it.
"""

from __future__ import annotations

import copy
import json

import pytest
from federation_helpers import micro_federation
from flwr.app import Message

from aggregator.inprocess import InProcessGrid
from aggregator.simulate_cli import simulate
from fed_unimiss import exchange as ex


class KilledAggregator(RuntimeError):
    pass


class ReplayingGrid(InProcessGrid):
    """M keeps its round-1 reply and sends it again in round 3; ``crash`` stops the
    aggregator at round 3's first train instruction, as a kill would."""

    kept: dict[str, object] = {}
    crash = True

    def deliver(self, msg: Message) -> Message | None:
        is_train = msg.metadata.message_type == ex.TRAIN
        round_num = str(msg.content.config_records[ex.CONFIG][ex.ROUND]) if is_train else ""
        if is_train and round_num == "3" and type(self).crash:
            raise KilledAggregator("the aggregator was killed at the start of round 3")
        reply = super().deliver(msg)
        site = self.contexts[msg.metadata.dst_node_id].node_config[ex.NODE_SITE_NAME]
        if not is_train or site != "M" or reply is None or reply.has_error():
            return reply
        if round_num == "1":
            self.kept.update(arrays=copy.deepcopy(reply.content[ex.ARRAYS]),
                             metrics=copy.deepcopy(reply.content[ex.METRICS]))
        elif round_num == "3":
            reply.content[ex.ARRAYS] = self.kept["arrays"]
            reply.content[ex.METRICS] = self.kept["metrics"]
        return reply


@pytest.mark.slow
def test_a_replay_from_before_an_aggregator_restart_is_still_rejected(phantom_sites, tmp_path):
    cfg = micro_federation(tmp_path / "fed.yaml", min_sites=2, evaluate=False,
                           exchange={"down": "fp32", "up": "fp32"})
    from fed_unimiss.data.phantom import write_phantoms

    write_phantoms(tmp_path / "M", n_ct=1, n_xray=3, seed=4)
    sites = [*phantom_sites.items(), ("M", tmp_path / "M")]
    run = tmp_path / "run"
    ReplayingGrid.kept, ReplayingGrid.crash = {}, True
    with pytest.raises(KilledAggregator):
        simulate(cfg, sites, 4, run, grid_cls=ReplayingGrid)
    assert (run / "replays.safetensors").is_file()
    ReplayingGrid.crash = False
    simulate(cfg, sites, 4, run, resume=True, grid_cls=ReplayingGrid)
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert "M" in rows[0]["sites"] and "M" in rows[1]["sites"]
    assert "M" not in rows[2]["sites"]
    assert "state identical to a reply of M in round 1" in rows[2]["rejected"]["M"]
    assert "M" in rows[3]["sites"]  # honest again: accepted
