"""``FederationConfig``: how rounds run, loaded from ``configs/federation/*.yaml``.

The federation YAML names a training recipe (the same ``Recipe`` centralized pretraining uses)
and adds what only a federation has: steps per round, the quorum and deadline of a round, the
bound on an update's norm and the aggregation rule. It is read at the coordinator only; sites
receive the resolved recipe inside every instruction and keep nothing about it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fed_unimiss.config import ConfigError, load_yaml, read_yaml
from fed_unimiss.exchange_config import ExchangeConfig

if TYPE_CHECKING:  # the recipe pulls in the model package (torch); federation.py stays light
    from fed_unimiss.ssl.config import Recipe

__all__ = ["FederationConfig", "load_federation", "resolve_recipe"]


@dataclass(frozen=True)
class FederationConfig:
    """Rules of a federated pretraining run (one instance per run, saved in every checkpoint)."""

    # Training recipe (model/data/ssl): a YAML path, relative to this file's folder, or the
    # recipe inline as a mapping.
    recipe: str | dict[str, Any] = "../pretrain/micro.yaml"
    # Changes to the recipe for this federation, merged section by section, e.g.
    # {ssl: {steps_per_epoch: 2}} to alternate 2D and 3D epochs within a few rounds.
    recipe_overrides: dict[str, Any] = field(default_factory=dict)
    # Optimiser steps each site runs per round. More steps = fewer, larger updates (less
    # traffic, more client drift); DINO-style recipes tolerate tens to hundreds.
    local_steps: int = 4
    # A round aggregates if at least this many valid replies arrived by the deadline; else the
    # run stops with an error and the last complete checkpoint stays intact.
    min_sites: int = 1
    # Seconds a round waits for replies. Set it above the slowest site's local training time.
    round_timeout: float = 600.0
    # Absolute bound on the L2 norm of each part of an update (reply - global). null (the
    # default): bounds derived from the recipe. Student: Adam's step bound, 3 x peak lr x
    # local_steps x sqrt(student parameters) + the weight-decay pull (7.2 for the micro
    # federation, 8x the largest honest micro update measured, docs/federation.md
    # "Robustness"). Teacher: its EMA's share of the student-teacher gap plus that bound.
    # Center: head logits are cosines, so every coordinate must lie in [-1.05, 1.05] and the
    # update is at most 2.1 sqrt(out_dim). A number replaces all three with one bound for every
    # part; raise it only for optimisers that move faster than Adam.
    max_update_norm: float | None = None
    # Round-relative check: a reply is rejected when the norm of its student, teacher or center
    # update exceeds norm_factor x that part's median over the round's replies. Honest micro
    # sites reach 2.7x (an X-ray site among CT-phase sites); lower it only for uniform sites.
    norm_factor: float = 5.0
    # Direction check: a reply is rejected when the cosine between its teacher update and the
    # coordinate-wise median of the other replies' teacher updates is below this (a
    # sign-flipped update). Measured on micro: honest >= -0.03, flipped <= -0.22 (round 1, the
    # hardest); null turns the check off.
    min_cosine: float | None = -0.1
    # The largest expected patients per step a DP site may use (its Poisson plan bounds its
    # counts). null: site_privacy's dp-patients-per-step, else the DP default (4).
    max_patients_per_step: float | None = None
    # mean: sample-weighted mean (FedAvg) of the screened replies. clipped_mean: the same after
    # clipping every update part to the round's median norm (changes honest rounds too).
    # median / trimmed_mean: coordinate-wise robust statistics over eligible sites, unweighted.
    # All modes hold the round's replies in memory until the round closes (screening needs the
    # round's medians). Measured costs and robustness: docs/benchmarks.md, "Robustness".
    aggregation: Literal["mean", "clipped_mean", "median", "trimmed_mean"] = "mean"
    # Fraction cut from each end per coordinate in trimmed_mean (0.1 = drop top and bottom 10%).
    trim_fraction: float = 0.1
    # Also ask every site for the self-distillation loss of the new global model each round.
    evaluate: bool = True
    # Batches each site evaluates on; small keeps evaluation cheap.
    eval_batches: int = 2
    # Every probe_every rounds the train instruction asks sites that hold a labelled probe set
    # (site.yaml ``probe:``) to probe the global teacher and student they received, before
    # training: k-NN and linear balanced accuracy per encoder stage, numbers only (rounds.jsonl
    # "probe", `aggregator status`, the dashboard). Round 1 probes the initial model. 0 = off.
    probe_every: int = 0
    # Seconds between polls for replies (Flower's own send_and_receive sleeps 3 s).
    poll_interval: float = 0.2
    # dp-* node config (e.g. {dp-epsilon: 8, dp-delta: 1e-5}) that every SIMULATED site
    # starts with (simulate/demo only; a deployed site sets its own with `site start --dp-...`).
    site_privacy: dict[str, Any] | None = None
    # Accept updates from differentially private sites only. Every train instruction
    # says so; a site without DP refuses (error 5103) rather than release a non-private update,
    # and a reply without the `epsilon` a DP site reports is rejected. The aggregator cannot
    # verify DP: it trusts each site's report (docs/privacy.md, "Required DP").
    require_dp: bool = False
    # How the state travels (fed_unimiss/exchange_codec.py; docs/federation.md,
    # "Exchange"). down: fp32 | bf16 | fp16 | q8_delta (int8 change of a base the sites hold,
    # error feedback at the aggregator); up: fp32 | bf16 | fp16 | q8_delta (int8 update, error
    # feedback at the site); teacher: exchanged | local (a method change). Announced in
    # every instruction; a site that cannot honour it refuses the round. Checkpoints stay fp32.
    # up: secure (with an optional secure: {bits, levels, clip, threshold, block, neighbours}) masks
    # every update: the aggregator sums what it cannot read (docs/privacy.md, "Secure
    # aggregation"); it needs aggregation: mean, min_sites >= 3 and a roster of site keys.
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)

    def validate(self) -> None:
        try:
            self.exchange.validate()
        except ValueError as e:
            raise ValueError(f"exchange.{e}") from None
        if self.local_steps < 1:
            raise ValueError(f"local_steps: must be >= 1, got {self.local_steps}")
        if self.min_sites < 1:
            raise ValueError(f"min_sites: must be >= 1, got {self.min_sites}")
        if not self.round_timeout > 0:
            raise ValueError(f"round_timeout: must be > 0 seconds, got {self.round_timeout}")
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ValueError(f"max_update_norm: must be > 0 (or null for the recipe's Adam "
                             f"bound), got {self.max_update_norm}")
        if not self.norm_factor > 1:
            raise ValueError(f"norm_factor: must be > 1 (a multiple of the round's median "
                             f"update norm), got {self.norm_factor}")
        if self.min_cosine is not None and not -1 <= self.min_cosine < 1:
            raise ValueError(f"min_cosine: must be in [-1, 1) or null, got {self.min_cosine}")
        if self.max_patients_per_step is not None and not self.max_patients_per_step > 0:
            raise ValueError(f"max_patients_per_step: must be > 0 or null, got "
                             f"{self.max_patients_per_step}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction: must be in [0, 0.5), got {self.trim_fraction}")
        if self.probe_every < 0:
            raise ValueError(f"probe_every: must be >= 0 (0 = no probe), got {self.probe_every}")
        if self.eval_batches < 1:
            raise ValueError(f"eval_batches: must be >= 1, got {self.eval_batches}")
        if not 0 < self.poll_interval <= 10:
            raise ValueError(f"poll_interval: must be in (0, 10] seconds, got {self.poll_interval}")
        if self.exchange.masked:
            self._validate_secure()

    def _validate_secure(self) -> None:
        """Refuse what secure aggregation cannot do (docs/privacy.md, "Secure aggregation")."""
        if self.aggregation != "mean":
            raise ValueError(
                f"aggregation: {self.aggregation} needs every site's update, which exchange.up: "
                "secure hides from the aggregator (it recovers only the weighted sum); use "
                "aggregation: mean, or a readable up codec for robust aggregation")
        if self.min_sites < 3:
            raise ValueError(
                f"min_sites: must be >= 3 with exchange.up: secure, got {self.min_sites}: a sum of "
                "two updates tells each of the two sites the other's update exactly, and a sum of "
                "one is that site's update")


def load_federation(path: str | Path) -> FederationConfig:
    """Load and validate a federation YAML; errors name the file and the field."""
    return load_yaml(FederationConfig, path)


def resolve_recipe(cfg: FederationConfig, config_path: str | Path) -> Recipe:
    """The ``Recipe`` the federation trains, loaded from its path or its inline mapping."""
    from fed_unimiss.ssl.config import recipe_from_dict

    if isinstance(cfg.recipe, dict):
        data, where = dict(cfg.recipe), f"{config_path}:recipe"
    else:
        recipe_path = Path(cfg.recipe)
        if not recipe_path.is_absolute():
            recipe_path = Path(config_path).resolve().parent / recipe_path
        try:
            data = read_yaml(recipe_path, "recipe")
        except ConfigError as e:
            raise ConfigError(f"{config_path}: recipe: {e}") from e
        where = str(recipe_path)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with model, data and ssl sections")
    for section, changes in cfg.recipe_overrides.items():
        if not isinstance(changes, dict):
            raise ConfigError(f"{config_path}: recipe_overrides.{section}: expected a mapping")
        data[section] = {**(data.get(section) or {}), **changes}
    return recipe_from_dict(data, where)
