"""fed-unimiss: federated UniMiSS pretraining of the MiT on 2D X-rays and 3D CT.

This package is the science (models, self-distillation, data, privacy, checkpoints). It is pure
PyTorch and never imports flwr: the Flower adapters live in ``site_client`` and ``aggregator``.
"""

__version__ = "0.1.0"
