"""The train stage's settings: common fields, and a part each for GeM mode, its Lw and CGD mode.

Each part checks itself when it is made, so the Python API gets the command line's checks;
the command line keeps flat flag names (``--nnum``, not ``--gem.nnum``: ``model.cli.run_cli``
omits the parts' prefixes, and their field names are distinct for that reason; Lw is fitted
as ``pipeline.whiten`` fits it, ``model.whitening_fit.LwFit``). The workers receive the frozen
``TrainConf`` as it is, its mode's defaults filled in (``resolved``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from model.cli import FlatFlags, flat_settings
from model.settings import raise_problems
from model.whitening_fit import LwFit
from pipeline.train.images import PRECISIONS

__all__ = ["MODES", "CgdPart", "GemPart", "LwPart", "TrainConf"]

MODES = ("gem", "cgd")

_NOT_CONTENT = frozenset(
    {
        "images",
        "output",
        "pairs",
        "weights",
        "name",
        "storage_path",
        "workers",
        "use_gpu",
        "mining_cpus",
        "mining_gpus",
        "device_batch",
        "max_failures",
        "overwrite",
    }
)
"""Fields that do not change the network trained: where things lie, how the work is shared
(``images``, ``pairs`` and ``weights`` are inputs: their identities are fingerprinted)."""


def _at_least(part: Any, minimum: int, *names: str) -> list[str]:
    """``--name must be at least minimum`` for each of ``names`` below it (unset passes)."""
    return [
        f"--{name.replace('_', '-')} must be at least {minimum}, not {getattr(part, name)}"
        for name in names
        if getattr(part, name) is not None and getattr(part, name) < minimum
    ]


@dataclass(frozen=True)
class GemPart:
    """GeM mode: mined tuples and validation on held-out clusters."""

    nnum: int = 5
    """GeM mode: hard negatives per query (nearest of other clusters, one per cluster)."""
    queries: int = 2000
    """Queries per epoch (all when there are fewer)."""
    pool_size: int | None = None
    """Negatives from a seeded sample of this many training photos each epoch (the epoch's
    queries among them); default the whole training collection."""
    tuples_per_step: int = 5
    """Tuples per optimizer step, all workers together (the reference's batch of 5)."""
    val_size: int | None = None
    """GeM mode: longest side at which validation describes the photos; default --whiten-size
    (extract's size: the epoch is chosen by how it will be used). At the training size one
    description an epoch serves mining too."""

    def __post_init__(self) -> None:
        raise_problems(
            _at_least(self, 1, "nnum", "queries", "tuples_per_step")
            + _at_least(self, 2, "pool_size")
            + _at_least(self, 64, "val_size")
        )


@dataclass(frozen=True)
class LwPart:
    """GeM mode: the learned whitening (Lw) the run hands over, or starts from."""

    whiten: bool = True
    """After training, learn Lw from the training clusters' pairs into OUTPUT's checkpoint."""
    whiten_size: int = 1024
    """Longest side of the descriptors Lw is learned on (extract's default)."""
    fit: LwFit = field(default_factory=LwFit)
    """Lw's shrinkage, size and fewest pairs, as pipeline.whiten takes them."""
    keep_whitening: Literal["if-better", "always"] = "if-better"
    """Store Lw only when it does not lower the held-out clusters' mAP at --whiten-size."""
    fold_whitening: bool = False
    """Start from --weights' Lw folded into the head's FC layer (W = P, b = −P m)."""

    def __post_init__(self) -> None:
        problems = _at_least(self, 1, "whiten_size")
        if self.keep_whitening not in ("if-better", "always"):
            problems.append(f"--keep-whitening {self.keep_whitening!r}: use if-better or always")
        raise_problems(problems)


@dataclass(frozen=True)
class CgdPart:
    """CGD mode: class-balanced P×K batches, triplet plus label-smoothed cross-entropy."""

    label_column: str = "auto"
    """The images table's column naming each photo's class: label, scene (a folder per class
    ingests as scenes), or auto (label where photos have one, else scene)."""
    classes_per_batch: int = 8
    """P of the P×K batches, per worker."""
    photos_per_class: int = 4
    """K of the P×K batches."""
    label_smoothing: float = 0.1
    temperature: float = 0.5
    cgd_descriptors: str = "SG"
    cgd_dim: int = 1536

    def __post_init__(self) -> None:
        problems = _at_least(self, 1, "classes_per_batch", "cgd_dim")
        if self.photos_per_class < 2:
            problems.append("--photos-per-class must be at least 2 (a positive in every batch)")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"--label-smoothing is a share in [0, 1), not {self.label_smoothing}")
        if self.temperature <= 0:
            problems.append(f"--temperature must be positive, not {self.temperature}")
        raise_problems(problems)


@dataclass(frozen=True)
class TrainConf(FlatFlags):
    """Settings of one training run; every field is a command-line flag."""

    images: str
    """The ingest output (the photos' bytes; CGD: their labels)."""
    output: str
    """Folder or s3:// prefix: the best checkpoint (with its Lw), metrics.json, curves.png, and
    the manifest once the run is whole."""
    pairs: str | None = None
    """GeM mode: the pairs output (its folder, or its pairs table's file), or
    cnnimageretrieval-pytorch's pairs file (``retrieval-SfM-120k.pkl``, with ``--images`` its
    ``ims`` folder)."""
    mode: Literal["gem", "cgd"] = "gem"
    """gem (SfM pairs, contrastive loss, mined negatives) or cgd (class labels)."""
    weights: str = "imagenet"
    """Start from ImageNet Lite0 (+ GeM, or + the CGD head), or from a checkpoint directory."""
    name: str = "cirray-train"
    storage_path: str | None = None
    """Ray Train's storage (local or s3://); default OUTPUT/ray. Same name + storage: resume."""
    workers: int = 1
    use_gpu: bool = False
    mining_cpus: float | None = None
    """CPUs the GeM mode's mining actor reserves (its FAISS threads): default 2 on a cluster of
    several nodes, none on one machine (it shares the cores the workers leave it)."""
    mining_gpus: float = 0.0
    """GPUs it reserves; with one (and faiss-gpu) the pool is searched there."""
    epochs: int = 5
    lr: float = 1e-6
    """Adam's rate: small, as fine-tuning ImageNet weights on few photos wants."""
    lr_decay: float = math.exp(-0.01)
    """Per epoch, as the GeM paper's exp(-0.01)."""
    weight_decay: float = 1e-6
    margin: float | None = None
    """GeM: contrastive margin, default 0.7 for Lite0's GeM descriptors (the paper: 0.85 for
    ResNet-101). CGD: batch-hard triplet margin, default 0.1 (the paper's)."""
    image_size: int | None = None
    """GeM: longest side, default 362 (the paper's). CGD: the square side, default 224."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto (bf16 + channels-last on GPUs, fp32 on CPUs), fp32 or bf16."""
    device_batch: int | None = None
    """Images per forward pass (one image size each): default 64 on a GPU, 16 on a CPU."""
    augment: bool = False
    """Random crops, flips and brightness/contrast jitter of the training images."""
    freeze_bn: bool = True
    trainable_stages: int | None = None
    """Train only the trunk's last N stages and the head, the others kept at their start
    weights (Lite0 has 9: the stem, 7 block stages, the head convolution); unset: all."""
    held_out: float = 0.2
    """GeM: share of the queries whose clusters are held out; CGD: share of the classes."""
    max_failures: int = 1
    seed: int = 0
    overwrite: bool = False
    """Replace an output made from other settings or inputs (else the run stops)."""
    gem: GemPart = field(default_factory=GemPart)
    lw: LwPart = field(default_factory=LwPart)
    cgd: CgdPart = field(default_factory=CgdPart)

    def __post_init__(self) -> None:
        problems = _at_least(self, 1, "workers", "epochs", "device_batch")
        problems += _at_least(self, 64, "image_size")
        if self.mode not in MODES:
            problems.append(f"--mode {self.mode!r}: use gem or cgd")
        if self.mode == "gem" and not self.pairs:
            problems.append("--pairs is needed in GeM mode (the folder pipeline.pairs wrote)")
        if self.mode == "gem" and self.gem.tuples_per_step < self.workers:
            problems.append(
                f"--tuples-per-step {self.gem.tuples_per_step} must be at least "
                f"--workers {self.workers} (every worker computes a share of each "
                "step)"
            )
        if self.precision not in PRECISIONS:
            problems.append(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.lr <= 0:
            problems.append(f"--lr must be positive, not {self.lr}")
        if not 0 < self.held_out < 1:
            problems.append(f"--held-out is a share in (0, 1), not {self.held_out}")
        if self.margin is not None and self.margin <= 0:
            problems.append(f"--margin must be positive, not {self.margin}")
        if self.lw.fold_whitening and self.weights == "imagenet":
            problems.append("--fold-whitening needs --weights: a checkpoint with a learned Lw")
        raise_problems(problems)

    def resolved(self) -> TrainConf:
        """This run with its mode's defaults filled in (what the workers run with)."""
        gem = self.mode == "gem"
        return replace(
            self,
            margin=self.margin if self.margin is not None else (0.7 if gem else 0.1),
            image_size=self.image_size or (362 if gem else 224),
            gem=replace(self.gem, val_size=self.gem.val_size or self.lw.whiten_size),
        )

    def settings(self) -> dict[str, Any]:
        """Every field, the parts' too, by flag name, with the mode's defaults filled in."""
        return flat_settings(self.resolved())

    def content_settings(self) -> dict[str, Any]:
        """The settings that change the network trained (the output's fingerprint): the
        common ones and those of the mode's parts."""
        conf = self.resolved()
        common = {k: v for k, v in conf.settings().items() if k not in _NOT_CONTENT}
        parts = (conf.gem, conf.lw) if conf.mode == "gem" else (conf.cgd, conf.lw)
        names = {n for part in (conf.gem, conf.lw, conf.cgd) for n in flat_settings(part)}
        kept = {n for part in parts for n in flat_settings(part)}
        return {k: v for k, v in common.items() if k not in names or k in kept}
