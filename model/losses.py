"""Training losses of the two papers.

GeM trains on tuples (query, positive, negatives) with a contrastive loss; CGD trains on
class-balanced batches with a batch-hard triplet loss plus a label-smoothed, temperature-scaled
cross-entropy on the auxiliary classifier. The batch-hard triplet comes from
pytorch-metric-learning (its loss, miner and class-balanced sampler are well tested); the tuple
losses are a few lines of maths kept here as functions with thin module wrappers.

The two triplet losses give ``margin`` different units, each as its source does:

- ``triplet_loss`` / ``TripletLoss`` (GeM tuples, cirtorch's ``triplet_loss``): squared
  Euclidean distances, summed over triplets; the margin is in squared-distance units.
- ``BatchHardTripletLoss`` (CGD, pytorch-metric-learning's ``TripletMarginLoss`` with
  ``BatchHardMiner``): Euclidean distances of L2-normalised embeddings, averaged over the
  triplets whose loss is non-zero; the margin is in distance units.

On unit vectors ``‖a − b‖² = 2 − 2·cos(a, b)``, so the same number is a different demand: a
margin of 0.1 on squared distances is about 0.1 / (‖a − p‖ + ‖a − n‖) on plain distances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BatchHardTripletLoss",
    "ContrastiveLoss",
    "LabelSmoothingCrossEntropy",
    "TripletLoss",
    "contrastive_loss",
    "triplet_loss",
    "tuple_pairs",
]


def contrastive_loss(
    anchors: torch.Tensor, others: torch.Tensor, is_positive: torch.Tensor, *, margin: float = 0.7
) -> torch.Tensor:
    """GeM's contrastive loss summed over pairs.

    ``½·d²`` for a positive pair and ``½·max(0, margin − d)²`` for a negative one, ``d`` the
    Euclidean distance between the (L2-normalised) descriptors of a pair.
    """
    _check_pairs(anchors, others, is_positive)
    d = torch.linalg.vector_norm(anchors - others, dim=1)
    y = is_positive.to(d.dtype)
    return 0.5 * (y * d.pow(2) + (1 - y) * torch.clamp(margin - d, min=0).pow(2)).sum()


def triplet_loss(
    anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, *, margin: float = 0.1
) -> torch.Tensor:
    """GeM's triplet loss: ``Σ_i max(0, ‖a_i − p_i‖² − ‖a_i − n_i‖² + margin)``.

    Distances are squared Euclidean distances of the descriptors as given (no normalisation
    here; GeM's descriptors are already L2-normalised), the reduction is a sum over triplets
    (zero-loss triplets included, so the loss grows with the batch), and ``margin`` is in
    squared-distance units. Source: cirtorch's ``layers/functional.py::triplet_loss``
    (filipradenovic/cnnimageretrieval-pytorch), which this matches.
    """
    if not anchors.shape == positives.shape == negatives.shape:
        raise ValueError(
            f"triplet shapes differ: {tuple(anchors.shape)}, {tuple(positives.shape)}, "
            f"{tuple(negatives.shape)}"
        )
    d_pos = (anchors - positives).pow(2).sum(dim=1)
    d_neg = (anchors - negatives).pow(2).sum(dim=1)
    return torch.clamp(d_pos - d_neg + margin, min=0).sum()


def tuple_pairs(tuples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``[T, 2 + n_neg, D]`` tuples (query, positive, negatives) into contrastive pairs."""
    if tuples.dim() != 3 or tuples.shape[1] < 2:
        raise ValueError(
            f"tuples must be [T, 2 + n_neg, D] (query, positive, negatives...), "
            f"got shape {tuple(tuples.shape)}"
        )
    t, n, d = tuples.shape
    anchors = tuples[:, :1].expand(t, n - 1, d).reshape(-1, d)
    others = tuples[:, 1:].reshape(-1, d)
    is_positive = torch.zeros(t, n - 1, dtype=torch.bool, device=tuples.device)
    is_positive[:, 0] = True
    return anchors, others, is_positive.reshape(-1)


class ContrastiveLoss(nn.Module):
    """Contrastive loss over tuples ``[T, 2 + n_neg, D]``: query, positive, negatives."""

    def __init__(self, margin: float = 0.7) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, tuples: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(*tuple_pairs(tuples), margin=self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class TripletLoss(nn.Module):
    """``triplet_loss`` over tuples ``[T, 2 + n_neg, D]``: (query, positive, negative_j) for
    every negative j, so ``T · n_neg`` triplets, summed; squared Euclidean distances, ``margin``
    in squared-distance units (cirtorch's ``TripletLoss``).
    """

    def __init__(self, margin: float = 0.1) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, tuples: torch.Tensor) -> torch.Tensor:
        anchors, others, is_positive = tuple_pairs(tuples)
        n_neg = tuples.shape[1] - 2
        if n_neg < 1:
            raise ValueError("a triplet loss needs at least one negative per tuple")
        positives = others[is_positive].repeat_interleave(n_neg, dim=0)
        return triplet_loss(
            anchors[~is_positive], positives, others[~is_positive], margin=self.margin
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class BatchHardTripletLoss(nn.Module):
    """CGD's ranking loss: a batch-hard triplet loss over ``embeddings [B, D]`` and ``labels [B]``.

    For each anchor ``i`` that has both a positive and a negative in the batch, with ``d`` the
    Euclidean distance between L2-normalised embeddings (pytorch-metric-learning normalises
    them itself, so the scale of the input does not matter):
    ``l_i = max(0, max_{p: y_p = y_i, p ≠ i} d(i, p) − min_{n: y_n ≠ y_i} d(i, n) + margin)``.
    The loss is the mean of the non-zero ``l_i`` (zero-loss triplets do not dilute it), and 0
    when all are zero. ``margin`` is in (unsquared) distance units, in ``[0, 2]`` on unit vectors.
    Source: pytorch-metric-learning's ``TripletMarginLoss`` (``LpDistance(p=2, power=1,
    normalize_embeddings=True)``, ``AvgNonZeroReducer``) with ``BatchHardMiner``.
    """

    def __init__(self, margin: float = 0.1) -> None:
        from pytorch_metric_learning import losses as pml_losses  # SciPy with it: CGD mode only
        from pytorch_metric_learning import miners as pml_miners  # as above

        super().__init__()
        self.miner = pml_miners.BatchHardMiner()
        self.loss = pml_losses.TripletMarginLoss(margin=margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


class LabelSmoothingCrossEntropy(nn.Module):
    """CGD's auxiliary loss: cross-entropy on ``logits / temperature`` with smoothed labels."""

    def __init__(self, smoothing: float = 0.1, temperature: float = 0.5) -> None:
        super().__init__()
        if not 0 <= smoothing < 1:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.smoothing, self.temperature = smoothing, temperature

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits / self.temperature, labels, label_smoothing=self.smoothing)

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}, temperature={self.temperature}"


def _check_pairs(anchors: torch.Tensor, others: torch.Tensor, is_positive: torch.Tensor) -> None:
    if anchors.shape != others.shape or anchors.dim() != 2:
        raise ValueError(
            f"pairs need two [P, D] tensors of one shape, got {tuple(anchors.shape)} "
            f"and {tuple(others.shape)}"
        )
    if is_positive.shape != anchors.shape[:1]:
        raise ValueError(f"is_positive must have shape [{anchors.shape[0]}]")
