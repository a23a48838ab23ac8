"""The two frozen-feature classifiers: DINO's weighted k-NN and a linear probe.

k-NN (Caron et al. 2021, ``eval_knn.py``): features are L2-normalised; each query takes its
``k`` nearest training items by cosine similarity, each neighbour votes for its class with
weight ``exp(sim / T)`` (T = 0.07), and the class with the largest summed weight wins (ties:
the lowest class index). The weighted vote is the protocol the reference numbers were
measured with; it lets close neighbours outvote far ones, so k = 20 suits both small and large
classes. No training, so it measures the feature geometry alone.

The linear probe is a multinomial logistic regression on features standardised with the
training mean and std, trained by full-batch L-BFGS with an L2 penalty and class-balanced
cross-entropy (the probe is scored by balanced accuracy). It measures what a linear read-out
can separate, which k-NN under-rates for features that are linear but not clustered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_predict", "linear_probe_predict"]


@torch.no_grad()
def knn_predict(train_x: Tensor, train_y: Tensor, query_x: Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 4096) -> Tensor:
    """Predicted class of every query (N_q,) by the temperature-weighted cosine k-NN vote."""
    train = F.normalize(train_x.float(), dim=1)
    k = min(k, train.shape[0])
    preds = []
    for start in range(0, query_x.shape[0], chunk):
        query = F.normalize(query_x[start:start + chunk].float(), dim=1)
        sims, idx = (query @ train.T).topk(k, dim=1)  # (n, k) each
        weights = (sims / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_y[idx].long(), weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def _standardise(train: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (query - mean) / std


def linear_probe_predict(train_x: Tensor, train_y: Tensor, query_x: Tensor, num_classes: int,
                         steps: int = 100, weight_decay: float = 1e-3) -> Tensor:
    """Predicted class of every query from a logistic regression fitted on the training items.

    Starts from zero weights, so the fit is deterministic given the features.
    """
    x, q = _standardise(train_x.float(), query_x.float())
    y = train_y.long()
    counts = torch.bincount(y, minlength=num_classes).float()
    class_weight = torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * (counts > 0)
                                                           .sum()), torch.zeros_like(counts))
    weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y, weight=class_weight)
        loss = loss + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return (q @ weight + bias).argmax(dim=1)
