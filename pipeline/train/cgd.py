"""CGD mode, one worker's side: class-balanced batches, ranking plus auxiliary classification.

The CGD paper's recipe (Jun et al. 2019): P×K batches (P classes, K photos each) from
pytorch-metric-learning's ``MPerClassSampler``, a batch-hard triplet loss on the combined
descriptor plus a label-smoothed (0.1), temperature-scaled (0.5) cross-entropy on the auxiliary
classifier, GeM's p fixed at 3 and the last stride removed (``NetworkMeta``'s CGD defaults),
photos resized to a fixed square. Each step the sampler draws one global batch of ``world``
P×K blocks from a seed shared by all workers, and each worker takes its own block, so a block
holds whole classes and the run is the same for any number of workers given the seed.
Validation: Recall@K of held-out classes' photos among themselves (each photo a query, the
others the database), classes the network never saw.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from model.evaluation import recall_at_k
from model.losses import BatchHardTripletLoss, LabelSmoothingCrossEntropy
from pipeline.train.collective import report_progress, sum_over_workers
from pipeline.train.conf import TrainConf
from pipeline.train.images import decode_photos, embed, freeze_batchnorm, mean_std

__all__ = ["RECALL_KS", "CgdEpochs", "held_out_recall", "split_classes"]

RECALL_KS = (1, 2, 4, 8)


def split_classes(
    labels: np.ndarray, held_out: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(training rows, validation rows)`` of ``labels``: about ``held_out`` of the classes
    (seeded, at least 2, never all but one) held out whole; classes with one photo train only."""
    classes, counts = np.unique(labels, return_counts=True)
    several = classes[counts >= 2]
    if len(several) < 4:
        raise ValueError(
            f"{len(several)} classes with 2 or more photos: CGD mode needs at least 4 "
            "(2 to validate Recall@K on, 2 to train on)"
        )
    order = np.random.default_rng(seed).permutation(several)
    count = min(max(2, round(held_out * len(classes))), len(several) - 2)
    held = np.isin(labels, order[:count])
    return np.flatnonzero(~held), np.flatnonzero(held)


def held_out_recall(vectors: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Recall@K of each row against the others (itself left out)."""
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    depth = min(max(RECALL_KS), len(labels) - 1)
    ranks = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    found = recall_at_k(ranks, labels, labels, RECALL_KS)
    return {f"val_recall@{k}": float(v) for k, v in found.items()}


class CgdEpochs:
    """Validation and epochs of the CGD mode for one worker (``rank`` of ``world``)."""

    score = "val_recall@1"

    def __init__(
        self,
        conf: TrainConf,
        data: dict[str, Any],
        precision: Any,
        *,
        device: Any,
        rank: int,
        world: int,
    ) -> None:
        self.conf, self.precision, self.device = conf, precision, device
        self.rank, self.world = rank, world
        labels = np.asarray(data["labels"])
        train, val = split_classes(labels, conf.held_out, conf.seed)
        ids = np.asarray(data["image_ids"], dtype=object)
        self.train_photos = decode_photos(
            conf.images, ids[train].tolist(), conf.image_size, square=True
        )
        self.val_photos = decode_photos(
            conf.images, ids[val].tolist(), conf.image_size, square=True
        )
        # classifier outputs: the training classes renumbered 0..C-1
        classes, self.train_labels = np.unique(labels[train], return_inverse=True)
        self.val_labels = labels[val]
        self.num_classes = len(classes)

    def validate(self, net: Any, next_epoch: int | None) -> dict[str, float]:
        """Rank 0 scores the held-out classes (few photos); the other workers go on."""
        if self.rank != 0:
            return {}
        with torch.no_grad():
            net.eval()
            vectors = (
                embed(
                    net,
                    self.val_photos,
                    mean_std(net, self.device),
                    precision=self.precision,
                    device=self.device,
                )
                .cpu()
                .numpy()
            )
        return held_out_recall(vectors, self.val_labels)

    def checkpoint_whitening(self) -> None:
        """Nothing beyond the weights: CGD mode learns no Lw."""

    def epoch(self, model: Any, net: Any, optimizer: Any, *, epoch: int) -> dict[str, float]:
        from pytorch_metric_learning.samplers import MPerClassSampler  # SciPy with it: CGD only
        from pytorch_metric_learning.utils import common_functions  # as above

        conf, rank, world = self.conf, self.rank, self.world
        block = conf.cgd.classes_per_batch * conf.cgd.photos_per_class
        steps = max(1, len(self.train_labels) // (block * world))
        # the sampler draws from pytorch-metric-learning's own NumPy generator: seed it
        common_functions.NUMPY_RANDOM = np.random.RandomState(conf.seed * 1000 + epoch)
        sampler = MPerClassSampler(
            self.train_labels,
            m=conf.cgd.photos_per_class,
            batch_size=block * world,
            length_before_new_iter=steps * block * world,
        )
        order = np.fromiter(iter(sampler), np.int64)
        ranking = BatchHardTripletLoss(margin=conf.margin)
        classification = LabelSmoothingCrossEntropy(conf.cgd.label_smoothing, conf.cgd.temperature)
        generator = None
        if conf.augment:
            generator = torch.Generator().manual_seed(conf.seed * 1000 + epoch * 16 + rank)
        normalise = mean_std(net, self.device)
        model.train()
        if conf.freeze_bn:
            freeze_batchnorm(model)
        total, started = 0.0, time.perf_counter()
        for step in range(steps):
            start = step * block * world + rank * block
            rows = order[start : start + block]
            labels = torch.as_tensor(self.train_labels[rows], device=self.device)
            optimizer.zero_grad()
            descriptors, logits = embed(
                lambda x: model(x, return_logits=True),
                self.train_photos.subset(rows),
                normalise,
                precision=self.precision,
                device=self.device,
                generator=generator,
            )
            loss = ranking(descriptors, labels) + classification(logits, labels)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            report_progress(rank, epoch, step + 1, steps=steps, loss_sum=total)
        steps_seconds = time.perf_counter() - started
        return {
            "loss": sum_over_workers(total, world, self.device) / (steps * world),
            "items": steps * block * world,
            "steps": steps,
            "steps_seconds": steps_seconds,
        }
