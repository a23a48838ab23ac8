"""The probe of the global model at a site that holds a labelled probe set (docs/site-guide.md).

When the round's train instruction asks for it (``probe`` in its config, every ``probe_every``
rounds), :func:`round_probe` probes the received global teacher and student before training
and returns the numbers the reply may carry (:func:`fed_unimiss.probe.federated.
probe_global_state`). The probe set is read and preprocessed once per run and kept in this
process. A DP site releases no probe numbers (like its evaluation losses, they are not covered
by its privacy accounting); a probe that fails is logged here and leaves the round's training
untouched: the reply then carries no probe numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from fed_unimiss import exchange as ex

__all__ = ["round_probe", "probe_requested"]

log = logging.getLogger(__name__)

_DATA: dict[tuple, Any] = {}  # (folder, task, config, recipe data) -> (ProbeConfig, ProbeData)


def probe_requested(node_config: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
    """This round asks for the probe and this site holds a probe set."""
    return bool(config.get(ex.PROBE)) and bool(node_config.get(ex.NODE_PROBE_DATA))


def _probe_data(node_config: Mapping[str, Any], recipe) -> tuple[Any, Any]:
    from fed_unimiss.probe.federated import site_probe_config
    from fed_unimiss.probe.run import load_probe_data

    folder = str(node_config[ex.NODE_PROBE_DATA])
    task = str(node_config.get(ex.NODE_PROBE_TASK) or "seg3d")
    config = node_config.get(ex.NODE_PROBE_CONFIG) or None
    key = (folder, task, config, recipe.data.ct_settings_hash(), repr(recipe.model))
    if key not in _DATA:
        _DATA.clear()  # one probe set per site process
        cfg = site_probe_config(task, recipe, config)
        _DATA[key] = (cfg, load_probe_data(cfg, folder, folder))
        log.info("probe set: %d items to learn from, %d to score (%s)", len(_DATA[key][1].train),
                 len(_DATA[key][1].val), task)
    return _DATA[key]


def round_probe(node_config: Mapping[str, Any], config: Mapping[str, Any], recipe,
                received: Mapping[str, Tensor], private: bool) -> dict[str, float]:
    """The probe numbers of this round's reply ({} when not asked, not possible or failed)."""
    if not probe_requested(node_config, config):
        return {}
    if private:
        log.info("probe requested: not run, a DP site releases no probe numbers")
        return {}
    from fed_unimiss.probe.federated import probe_global_state

    try:
        cfg, data = _probe_data(node_config, recipe)
        metrics = probe_global_state(received, recipe.model, data, cfg)
    except Exception:  # noqa: BLE001 - the probe is an extra: training goes on without it
        log.exception("the probe of the global model failed; this round's reply carries no "
                      "probe numbers")
        return {}
    log.info("probe of the global model: %.1f s, %d items scored", metrics[ex.PROBE_SECONDS],
             int(metrics[ex.PROBE_ITEMS]))
    return metrics
