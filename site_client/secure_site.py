"""A site's side of a secure round (``exchange.up: secure``): one party kept between messages.

The round is the train instruction plus three stages (fed_unimiss/secure_aggregation)::

    train          -> trains, quantises its update into the announced ring, advertises keys
    share_keys     -> checks every advert against its roster, seals key shares for each peer
    masked_input   -> opens its shares, sends its ring vector under masks
    unmask         -> reveals the shares that let the aggregator remove the masks

The :class:`~fed_unimiss.secure_aggregation.SiteParty` and the ring vector live in the site's
session (:class:`~site_client.site_session.SiteSession`) between messages: in the warm worker in
deployment, in the ClientApp's process under ``simulate``. A site that lost them (a restart)
answers the next stage with an error and counts as dropped, which the protocol tolerates.

What leaves the site: its signed public keys, shares sealed for other sites, the masked vector
(uniform in the ring on its own) and the revealed shares. Its counts travel in the clear with the
train reply (as in the plain exchange): the aggregator needs them for the weights and the count
bounds. No readable update, no norm.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fed_unimiss import exchange as ex
from fed_unimiss.secure_aggregation import SecureAggregationError, SiteParty
from fed_unimiss.secure_aggregation.keys import load_identity_key, load_roster
from fed_unimiss.secure_aggregation.ring import part_weights
from fed_unimiss.secure_aggregation.wire import (
    MASKED_INPUT,
    ROUND_ID,
    SHARE_KEYS,
    STAGE,
    SURVIVORS,
    UNMASK,
    from_arrays,
    masked_to_arrays,
    plan_from_config,
    to_arrays,
)
from site_client.round_messages import RoundReply, RoundRequest
from site_client.site_session import PendingRound, SiteSession

if TYPE_CHECKING:
    from site_client.local_state import SiteState

__all__ = ["train_reply", "stage_reply", "ADVERT", "SEALED", "INBOX", "CLIPPED"]

log = logging.getLogger(__name__)

ADVERT = "advert"  # train reply: advert/<field>
SEALED = "sealed"  # share_keys reply: sealed/<receiver>
INBOX = "inbox"  # masked_input instruction: inbox/<sender>
CLIPPED = "clipped"  # masked_input reply metric: coordinates the ring's clip cut

_FAILED = "site could not take part in this secure aggregation stage; see the site log"


def _keys(node_config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The site's identity key and roster from its node config; ``ValueError`` naming what is
    missing (both come from the site's kit: site.key and roster/)."""
    key_path, roster = node_config.get(ex.NODE_IDENTITY_KEY), node_config.get(ex.NODE_ROSTER)
    if not key_path or not roster:
        raise ValueError(f"secure aggregation needs the node config {ex.NODE_IDENTITY_KEY!r} "
                         f"(the kit's site.key) and {ex.NODE_ROSTER!r} (the kit's roster/)")
    return load_identity_key(Path(str(key_path))), load_roster(Path(str(roster)))


def _rounding_seed(train_seed: int, round_id: str, site: str) -> bytes:
    """32 bytes for the stochastic rounding: reproducible from the site's training seed (the
    noise need only be independent of the data, not secret; the ring module says why)."""
    return hashlib.sha256(f"fed-unimiss/secure-rounding/{train_seed}/{round_id}/{site}"
                          .encode()).digest()


def train_reply(session: SiteSession, site: SiteState, req: RoundRequest,
                public: dict[str, float], new_state: dict[str, torch.Tensor],
                received: dict[str, torch.Tensor], seed: int) -> RoundReply:
    """The train reply of a secure round: public metrics and this round's signed keys.

    Quantises the update into the announced ring now (weights from this round's counts) and
    keeps the vector and the party in the session for the stages to come.
    """
    session.secure = None
    try:
        plan = plan_from_config(req.config)
        if plan is None:
            raise ValueError("the instruction announces up: secure but no round plan")
        name = site.site_name
        if name is None or name not in plan.sites:
            raise ValueError(f"this site's name {name!r} is not among the round's sites "
                             f"{list(plan.sites)} (the coordinator's roster)")
        identity, roster = _keys(req.node_config)
        weights = part_weights(int(public.get(ex.SAMPLES_2D, 0)),
                               int(public.get(ex.SAMPLES_3D, 0)), plan.ring)
        exchange = session.exchange
        if exchange is None:
            raise RuntimeError("secure round before decode: the session has no exchange")
        vector, clipped = exchange.quantise_update(new_state, received, plan.ring, weights,
                                                   _rounding_seed(seed, plan.round_id, name))
        party = SiteParty(plan, name, identity, roster)
        advert = party.advertise()
    except (ValueError, OSError, SecureAggregationError) as e:
        log.error("secure aggregation: cannot take part in this round: %s", e)
        return RoundReply.failed(ex.ERROR_SECURE, _FAILED)
    session.secure = PendingRound(plan, party, vector, clipped)
    session.remember()
    log.info("secure round %s: update quantised (%d coordinates clipped), keys advertised",
             plan.round_id, clipped)
    return RoundReply(public, to_arrays({ADVERT: advert}), site_name=site.site_name)


def stage_reply(session: SiteSession, req: RoundRequest) -> RoundReply:
    """One stage after the train instruction; a refusal (a key its roster does not verify, a
    round it holds no party for) is an error reply, and the site drops out of the round."""
    stage, round_id = req.config.get(STAGE), req.config.get(ROUND_ID)
    pending = session.secure
    if pending is None or pending.plan.round_id != round_id:
        log.warning("secure stage %s of round %s: this site holds no party for that round (it "
                    "restarted, or refused the round's training); it drops out", stage, round_id)
        return RoundReply.failed(ex.ERROR_SECURE, _FAILED)
    party = pending.party
    try:
        if stage == SHARE_KEYS:
            sealed = party.share_keys(from_arrays(req.arrays))
            return RoundReply({}, to_arrays({SEALED: sealed}))
        if stage == MASKED_INPUT:
            inbox = from_arrays(req.arrays).get(INBOX, {})
            if pending.ring_vector is None:
                raise ValueError("the masked input was already sent")
            masked = party.masked_input(inbox, pending.ring_vector)
            pending.ring_vector = None
            return RoundReply({CLIPPED: float(pending.clipped)},
                              masked_to_arrays(masked, pending.plan.ring))
        if stage == UNMASK:
            survivors = json.loads(str(req.config.get(SURVIVORS, "[]")))
            if not isinstance(survivors, list) or not all(isinstance(s, str) for s in survivors):
                raise ValueError("the survivor list is not a list of site names")
            return RoundReply({}, to_arrays(party.unmask(survivors)))
    except (SecureAggregationError, ValueError) as e:
        log.error("secure aggregation: refused stage %s of round %s: %s", stage, round_id, e)
        return RoundReply.failed(ex.ERROR_SECURE, _FAILED)
    log.warning("unknown secure stage %r", stage)
    return RoundReply.failed(ex.ERROR_SECURE, _FAILED)
