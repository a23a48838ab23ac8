"""Frozen-feature probe: what an encoder has learned, per stage, in seconds.

- :func:`run_probe` (``fed-unimiss probe``): k-NN and linear probe on labelled folders, with a
  random encoder of the same shape as the reference, to metrics.json;
- :func:`probe_encoder`: the same on an encoder in memory (a site probing the global model).

Pure PyTorch; nothing here imports flwr.
"""

from .config import ProbeConfig, load_probe_config
from .run import ProbeData, load_probe_data, probe_encoder, run_probe

__all__ = ["ProbeConfig", "load_probe_config", "ProbeData", "load_probe_data", "probe_encoder",
           "run_probe"]
