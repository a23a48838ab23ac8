"""fed-unimiss: federated UniMiSS pretraining of the MiT on 2D X-rays and 3D CT.

This package is the science (models, self-distillation, data, privacy, checkpoints). It is pure
PyTorch and never imports flwr: the Flower apps of the site and of the coordinator are separate
packages built on this one, and it knows nothing of them.
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: `import fed_unimiss` stays light (no torch import)
    if name == "load_pretrained":
        from fed_unimiss.finetune.load import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'fed_unimiss' has no attribute {name!r}")
