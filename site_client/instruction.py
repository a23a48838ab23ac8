"""What the aggregator asks of every site in a round, read from the message's config.

Its own module because both the round's decisions (:mod:`site_client.round_work`) and the
site's session (:mod:`site_client.site_session`) read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fed_unimiss import exchange as ex
from fed_unimiss.exchange_codec import ExchangeConfig
from fed_unimiss.privacy import REQUIRE_DP
from fed_unimiss.ssl.config import Recipe, recipe_from_dict

__all__ = ["Instruction"]


@dataclass(frozen=True)
class Instruction:
    """What the aggregator asks of every site this round (the same for all sites)."""

    recipe: Recipe
    round: int
    local_steps: int
    start_step: int
    total_steps: int
    eval_batches: int
    require_dp: bool  # the federation accepts updates from DP sites only
    exchange: ExchangeConfig
    recipe_json: str

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Instruction:
        """Raises ``CodecError`` when the announced exchange cannot be honoured here."""
        exchange = ExchangeConfig.from_config(config)
        text = str(config[ex.RECIPE_JSON])
        recipe = recipe_from_dict(json.loads(text), "instruction recipe")
        return cls(recipe, int(config[ex.ROUND]), int(config[ex.LOCAL_STEPS]),
                   int(config[ex.START_STEP]), int(config[ex.TOTAL_STEPS]),
                   int(config[ex.EVAL_BATCHES]), bool(config.get(REQUIRE_DP, False)), exchange,
                   text)
