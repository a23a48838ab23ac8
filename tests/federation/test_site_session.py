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
from site_client.instruction import Instruction
from site_client.local_state import SiteState
from site_client.round_messages import RoundRequest
from site_client.round_work import SiteSessions
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


def _node_config(phantom_sites, tmp_path) -> dict:
    return {ex.NODE_DATA_PATH: str(phantom_sites["xr"]),
            ex.NODE_STATE_DIR: str(tmp_path / "state"), ex.NODE_SITE_NAME: "xr"}


def _global_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"student.w": torch.randn(30, 20, generator=g),
            "teacher.w": torch.randn(30, 20, generator=g),
            ex.CENTER_KEY: torch.rand(1, 50, generator=g) - 0.5}


def test_decode_and_encode_are_steps_the_aggregator_can_follow(instruction, phantom_sites,
                                                               tmp_path):
    node_config = _node_config(phantom_sites, tmp_path)
    job = Instruction.from_config(instruction)
    session = SiteSession(tmp_path / "state")
    glob = _global_state()
    aggregator = Exchange(EXCHANGE)

    # decode: the travelling tensors, and the site's own teacher (the student at first)
    req = _request(node_config, instruction, aggregator.send_state(glob).for_node(None))
    received = session.decode(req, job)
    assert sorted(received) == sorted(glob)
    assert torch.equal(received["teacher.w"], received["student.w"])
    assert session.exchange.base_digest == aggregator.base_digest  # a train message's base

    # encode: int8 blocks the aggregator decodes against its own global state
    site = SiteState.from_node_config(node_config)
    new_state = {k: v + 0.01 for k, v in received.items()}
    reply = session.encode(site, {ex.STEPS: 1}, new_state, received)
    assert reply.site_name == "xr" and reply.scales is not None
    payload = Payload({k: torch.from_numpy(v) for k, v in reply.arrays.items()},
                      {k: torch.from_numpy(v) for k, v in reply.scales.items()})
    reference = {k: glob[k] for k in aggregator.sent_keys(glob)}
    decoded = dict(aggregator.receive_update(payload, reference))
    assert sorted(decoded) == ["center", "student.w"]  # the teacher stays at the site
    torch.testing.assert_close(decoded["student.w"], glob["student.w"] + 0.01,
                               rtol=0, atol=1e-4)
    assert torch.equal(session.exchange.teacher["teacher.w"], new_state["teacher.w"])

    # the next round's delta applies to the base this session holds; the teacher is its own
    nxt = aggregator.send_state(glob).for_node(session.exchange.base_digest)
    assert nxt.what == "delta"
    again = session.decode(_request(node_config, instruction, nxt), job)
    assert torch.equal(again["teacher.w"], new_state["teacher.w"])

    # an evaluation's full state is not a base
    evaluation = aggregator.send_state(glob, train=False).for_node(None)
    held = session.exchange.base_digest
    session.decode(_request(node_config, instruction, evaluation, kind=ex.EVALUATE), job)
    assert session.exchange.base_digest == held

    # a new run remembers nothing of the last: a delta for the old base does not decode
    downlink = aggregator.send_state(glob)
    delta = downlink.for_node(downlink.previous)
    assert delta.what == "delta"
    with pytest.raises(CodecError, match="does not hold"):
        session.decode(_request(node_config, instruction, delta, run_id=2), job)
    assert not session.exchange.residual and not session.exchange.teacher


@pytest.mark.slow
def test_train_is_one_step_from_the_decoded_state(instruction, phantom_sites, tmp_path):
    node_config = _node_config(phantom_sites, tmp_path)
    job = Instruction.from_config(instruction)
    session = SiteSession(tmp_path / "state")
    runtime = Runtime(device="cpu")
    engine = session.engine(job, runtime, None)
    glob = engine.exchange_state()
    req = _request(node_config, instruction, Exchange(EXCHANGE).send_state(glob).for_node(None))
    received = session.decode(req, job)
    site = SiteState.from_node_config(node_config)
    data = session.data(site, job, req.run_id)
    assert session.data(site, job, req.run_id) is data  # the index is kept for the run
    trained = session.train(site, job, received, data, None, runtime, seed=0)
    assert trained.state is not None and trained.public[ex.STEPS] == 1
    assert any(not torch.equal(trained.state[k], received[k]) for k in received)
    assert session.engine(job, runtime, None) is engine  # the plain trainer is reused...
    assert not engine.optimizer.state  # ... with a fresh optimizer


def test_sessions_keep_one_session_per_site(tmp_path):
    sessions = SiteSessions()

    def req(state: str) -> RoundRequest:
        return RoundRequest(ex.TRAIN, 1, 1, {ex.NODE_STATE_DIR: str(tmp_path / state)}, {}, {})

    a = sessions.session(req("a"))
    assert sessions.session(req("a")) is a and sessions.session(req("b")) is not a
    reply = sessions.handle(req("a"))  # no instruction: a fixed error, never an exception
    assert reply.error is not None
