"""Losses computed against hand-worked values."""

import math

import pytest
import torch

from model.losses import (
    BatchHardTripletLoss,
    ContrastiveLoss,
    LabelSmoothingCrossEntropy,
    TripletLoss,
    contrastive_loss,
    triplet_loss,
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


def test_triplet_loss_sums_squared_distances_by_hand() -> None:
    """GeM (cirtorch): squared Euclidean distances, margin in squared units, summed."""
    # Two tuples (query, positive, two negatives); integer points so d² are whole numbers.
    tuples = torch.tensor(
        [
            [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [1.0, 1.0]],  # d²(q,p)=1; d²(q,n)=4, 2
            [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [3.0, 0.0]],  # d²(q,p)=1; d²(q,n)=1, 4
        ]
    )
    m = 1.5
    losses = [max(0, 1 - 4 + m), max(0, 1 - 2 + m), max(0, 1 - 1 + m), max(0, 1 - 4 + m)]
    assert losses == [0, 0.5, 1.5, 0]  # two of the four triplets cost nothing
    assert TripletLoss(margin=m)(tuples).item() == pytest.approx(sum(losses))  # 2.0, a sum
    # Plain distances would give max(0, 1 - 2 + m) + max(0, 1 - √2 + m) + ... ≠ 2.0:
    plain = max(0, 1 - 2 + m) + max(0, 1 - math.sqrt(2) + m) + max(0, 1 - 1 + m)
    assert plain != pytest.approx(2.0)
    anchors, positives = tuples[:, 0].repeat_interleave(2, 0), tuples[:, 1].repeat_interleave(2, 0)
    negatives = tuples[:, 2:].reshape(-1, 2)
    assert triplet_loss(anchors, positives, negatives, margin=m).item() == pytest.approx(2.0)
    # No normalisation inside: scaling the descriptors by 2 scales every d² by 4.
    scaled = [max(0, 4 - 16 + m), max(0, 4 - 8 + m), max(0, 4 - 4 + m), max(0, 4 - 16 + m)]
    assert TripletLoss(margin=m)(2 * tuples).item() == pytest.approx(sum(scaled))  # 1.5


def test_batch_hard_triplet_averages_non_zero_triplets_by_hand() -> None:
    """CGD (pytorch-metric-learning): plain distances, hardest pairs, mean over non-zero losses."""

    def chord(degrees: float) -> float:  # distance between unit vectors this far apart
        return 2 * math.sin(math.radians(degrees) / 2)

    angles = [0.0, 20.0, 60.0, 150.0]
    emb = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])
    labels = torch.tensor([0, 0, 1, 1])
    m = 0.5
    # Each anchor: its farthest positive, its nearest negative.
    losses = [
        max(0.0, chord(20) - min(chord(60), chord(150)) + m),  # 0°:   0.347 - 1.0   + m < 0
        max(0.0, chord(20) - min(chord(40), chord(130)) + m),  # 20°:  0.347 - 0.684 + m
        max(0.0, chord(90) - min(chord(60), chord(40)) + m),  # 60°:  1.414 - 0.684 + m
        max(0.0, chord(90) - min(chord(150), chord(130)) + m),  # 150°: 1.414 - 1.813 + m
    ]
    assert losses[0] == 0.0 and all(loss > 0 for loss in losses[1:])
    expected = sum(losses) / 3  # the mean over the three non-zero triplets, not over four
    loss = BatchHardTripletLoss(margin=m)
    assert loss(emb, labels).item() == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(sum(losses) / 4)
    # Embeddings are L2-normalised inside, so their scale does not change the loss.
    assert loss(3 * emb, labels).item() == pytest.approx(expected, rel=1e-5)
    # An anchor with no positive in the batch (label 2) forms no triplet and does not count.
    lone = torch.cat([emb, torch.tensor([[0.0, -1.0]])])
    lone_expected = (
        max(0.0, chord(20) - chord(60) + m)  # 0°: nearest negative still 60° (270° is 90° off)
        + max(0.0, chord(20) - chord(40) + m)
        + max(0.0, chord(90) - chord(40) + m)
        + max(
            0.0, chord(90) - min(chord(150), chord(130), chord(120)) + m
        )  # 150°: 270° is 120° off
    ) / 3
    assert loss(lone, torch.tensor([0, 0, 1, 1, 2])).item() == pytest.approx(
        lone_expected, rel=1e-5
    )


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
