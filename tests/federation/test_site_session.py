"""A site's session on its own: decode, train and encode as separate steps, and its memory."""

from __future__ import annotations

import json

import pytest
import torch
from federation_helpers import micro_federation

from fed_unimiss import exchange as ex
from fed_unimiss.exchange_codec import CodecError, ExchangeConfig
from fed_unimiss.exchange_link import Exchange, Payload
from fed_unimiss.federation import load_federation, resolve_recipe
from fed_unimiss.runtime import Runtime
from fed_unimiss.ssl.config import recipe_to_dict
from site_client.local_state import SiteState
from site_client.round_messages import RoundRequest
from site_client.round_work import Instruction, SiteSessions
from site_client.site_session import SiteSession

EXCHANGE = ExchangeConfig("q8_delta", "q8_delta", "local")


@pytest.fixture(scope="module")
def instruction(tmp_path_factory) -> dict:
    path = micro_federation(tmp_path_factory.mktemp("session") / "federation.yaml")
    recipe = resolve_recipe(load_federation(path), path)
    return {ex.RECIPE_JSON: json.dumps(recipe_to_dict(recipe), sort_keys=True), ex.ROUND: 1,
            ex.LOCAL_STEPS: 1, ex.START_STEP: 0, ex.TOTAL_STEPS: 2, ex.EVAL_BATCHES: 1,
            **EXCHANGE.to_config()}


def _request(node_config: dict, config: dict, payload: Payload, run_id: int = 1,
             kind: str = ex.TRAIN) -> RoundRequest:
    return RoundRequest(kind, run_id, 1, node_config, {**config, **payload.config},
                        {k: v.numpy().copy() for k, v in payload.arrays.items()})


def test_decode_train_encode_are_steps_the_aggregator_can_follow(instruction, phantom_sites,
                                                                 tmp_path):
    node_config = {ex.NODE_DATA_PATH: str(phantom_sites["both"]),
                   ex.NODE_STATE_DIR: str(tmp_path / "state"), ex.NODE_SITE_NAME: "both"}
    job = Instruction.from_config(instruction)
    session = SiteSession(tmp_path / "state")
    runtime = Runtime(device="cpu")
    glob = session.engine(job, runtime, None).exchange_state()
    aggregator = Exchange(EXCHANGE)

    # decode: the travelling tensors, and the site's own teacher (the student at first)
    req = _request(node_config, instruction, aggregator.send_state(glob).for_node(None))
    received = session.decode(req, job)
    assert sorted(received) == sorted(glob)
    assert session.exchange.base_digest == aggregator.base_digest  # a train message's base
    for name in received:
        if name.startswith(ex.TEACHER_PREFIX):
            twin = ex.STUDENT_PREFIX + name[len(ex.TEACHER_PREFIX):]
            assert torch.equal(received[name], received[twin])

    # train: one local step from what was decoded
    site = SiteState.from_node_config(node_config)
    data = session.data(site, job, req.run_id)
    assert session.data(site, job, req.run_id) is data  # the index is kept for the run
    trained = session.train(site, job, received, data, None, runtime, seed=0)
    assert trained.state is not None and trained.public[ex.STEPS] == 1
    assert any(not torch.equal(trained.state[k], received[k]) for k in received)

    # encode: int8 blocks the aggregator decodes against its own global state
    reply = session.encode(site, trained.public, trained.state, received)
    assert reply.site_name == "both" and reply.scales is not None
    payload = Payload({k: torch.from_numpy(v) for k, v in reply.arrays.items()},
                      {k: torch.from_numpy(v) for k, v in reply.scales.items()})
    reference = {k: glob[k] for k in aggregator.sent_keys(glob)}
    decoded = dict(aggregator.receive_update(payload, reference))
    assert sorted(decoded) == sorted(reference)
    assert all(not k.startswith(ex.TEACHER_PREFIX) for k in decoded)
    assert session.exchange.residual and session.exchange.teacher  # kept, never sent

    # the next round's delta applies to the base this session holds
    again = session.decode(_request(node_config, instruction,
                                    aggregator.send_state(glob).for_node(
                                        session.exchange.base_digest)), job)
    assert sorted(again) == sorted(glob)

    # a new run remembers nothing of the last: a delta for the old base does not decode
    delta = aggregator.send_state(glob).for_node(aggregator.base_digest)
    assert delta.what == "delta"
    with pytest.raises(CodecError, match="does not hold"):
        session.decode(_request(node_config, instruction, delta, run_id=2), job)
    assert not session.exchange.residual and not session.exchange.teacher


def test_sessions_keep_one_session_per_site(tmp_path):
    sessions = SiteSessions()

    def req(state: str) -> RoundRequest:
        return RoundRequest(ex.TRAIN, 1, 1, {ex.NODE_STATE_DIR: str(tmp_path / state)}, {}, {})

    a = sessions.session(req("a"))
    assert sessions.session(req("a")) is a and sessions.session(req("b")) is not a
    reply = sessions.handle(req("a"))  # no instruction: a fixed error, never an exception
    assert reply.error is not None
