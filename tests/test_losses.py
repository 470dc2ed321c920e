"""Losses computed against hand-worked values."""

import pytest
import torch

from model.losses import (
    BatchHardTripletLoss,
    ContrastiveLoss,
    LabelSmoothingCrossEntropy,
    TripletLoss,
    contrastive_loss,
    tuple_pairs,
)


def _unit(*xy: float) -> torch.Tensor:
    v = torch.tensor(xy, dtype=torch.float32)
    return v / v.norm()


def test_contrastive_loss_by_hand() -> None:
    q, p, n_far, n_near = _unit(1, 0), _unit(0.8, 0.6), _unit(-1, 0), _unit(0.6, 0.8)
    tuples = torch.stack([q, p, n_far, n_near]).unsqueeze(0)  # [1, 4, 2]
    d_pos = (q - p).norm().item()
    d_near = (q - n_near).norm().item()  # 0.894 < margin: penalised
    assert (q - n_far).norm().item() == pytest.approx(2.0)  # beyond the margin: free
    expected = 0.5 * d_pos**2 + 0.5 * (1.2 - d_near) ** 2
    assert ContrastiveLoss(margin=1.2)(tuples).item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_is_zero_for_perfect_pairs() -> None:
    a = torch.eye(3)
    others = torch.stack([a[0], -a[1], -a[2]])
    loss = contrastive_loss(a, others, torch.tensor([True, False, False]), margin=0.7)
    assert loss.item() == pytest.approx(0.0)


def test_tuple_pairs_layout() -> None:
    tuples = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    anchors, others, positive = tuple_pairs(tuples)
    assert anchors.squeeze(1).tolist() == [0, 0, 0, 4, 4, 4]
    assert others.squeeze(1).tolist() == [1, 2, 3, 5, 6, 7]
    assert positive.tolist() == [True, False, False, True, False, False]
    with pytest.raises(ValueError, match="2 \\+ n_neg"):
        tuple_pairs(torch.zeros(3, 5))


def test_triplet_loss_by_hand() -> None:
    q, p, n = _unit(1, 0), _unit(0.8, 0.6), _unit(0.6, 0.8)
    d_pos, d_neg = ((q - p) ** 2).sum().item(), ((q - n) ** 2).sum().item()
    loss = TripletLoss(margin=0.5)(torch.stack([q, p, n]).unsqueeze(0))
    assert loss.item() == pytest.approx(max(0.0, d_pos - d_neg + 0.5), rel=1e-6)


def test_batch_hard_triplet_uses_the_hardest_pairs() -> None:
    emb = torch.stack([_unit(1, 0), _unit(0.9, 0.1), _unit(0, 1), _unit(0.1, 0.9)])
    labels = torch.tensor([0, 0, 1, 1])
    assert BatchHardTripletLoss(margin=0.1)(emb, labels).item() == pytest.approx(0.0)
    swapped = torch.tensor([0, 1, 0, 1])  # positives now lie far apart: the loss must bite
    assert BatchHardTripletLoss(margin=0.1)(emb, swapped).item() > 0.5


def test_label_smoothing_cross_entropy_by_hand() -> None:
    logits, labels = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    loss = LabelSmoothingCrossEntropy(smoothing=0.3, temperature=0.5)(logits, labels)
    log_probs = torch.log_softmax(logits / 0.5, dim=1)[0]
    target = torch.tensor([0.7 + 0.1, 0.1, 0.1])
    assert loss.item() == pytest.approx(-(target * log_probs).sum().item(), rel=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        LabelSmoothingCrossEntropy(temperature=0.0)
