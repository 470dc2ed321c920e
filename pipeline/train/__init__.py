"""The train stage: fine-tune the retrieval network on Ray Train, GeM or CGD mode.

    python -m pipeline.train --pairs OUT/pairs --images OUT/images.parquet --output OUT/train
    python -m pipeline.train --mode cgd --images OUT/images.parquet --output OUT/train

Ray Train V2's ``TorchTrainer`` runs ``--workers`` DDP workers (gloo on CPUs, NCCL on GPUs).
**GeM mode** (``pipeline.train.gem``) trains on the SfM pairs: each epoch the workers describe
the negative pool into the mining-index actor (``cluster.mining``), which mines hard negatives of
the epoch's queries; tuples train with the contrastive loss; rank 0 scores held-out clusters
(mAP, plain and with Lw). **CGD mode** (``pipeline.train.cgd``) trains on class labels
(``--label-column`` of ``images.parquet``) with P×K batches, batch-hard triplet and label-smoothed
cross-entropy; rank 0 scores Recall@K on held-out classes. Both: Adam (GeM's p at 10× the rate,
no weight decay on it), exponential decay, BatchNorm frozen (``--freeze-bn``), bf16 and
channels-last on GPUs (``--precision``), augmentation by option.

Every epoch each worker reports ``loss``, the validation figures, ``seconds`` and the run's rate
(tuples or images per second, all workers together); rank
0 attaches the checkpoint (``model.pt``, ``meta.json``: the layout ``extract`` and ``evaluate``
take, plus ``train_state.pt`` to resume). A rerun with the same ``--name`` and storage resumes
from the latest checkpoint; worker failures are retried (``--max-failures``). At the end the best
epoch's checkpoint (the off-the-shelf network is epoch 0; in GeM mode with ``--whiten``, best as
handed over: with its validation's Lw where that is kept) is published to ``OUTPUT`` (a folder
or ``s3://`` prefix) with ``metrics.json`` (every epoch, the best marked), ``curves.png`` and,
last, ``_SUCCESS``: a rerun of the same settings finds it and skips; in GeM mode ``--whiten``
then learns Lw from the training clusters' whitening pairs over that network's descriptors at
extraction size and stores it as ``OUTPUT/whitening.npz``, which extract and evaluate apply,
unless it lowers the held-out clusters' mAP (``--keep-whitening``).
``--fold-whitening`` starts instead from a checkpoint's Lw folded into the head's FC layer
(W = P, b = −P m), to fine-tune the whitening end to end as the GeM paper does.

This module is the driver and the Ray Train loop; the worker side is one module per job:
``images``: photos to tensors, augmentation, the network run over many images at once (grouped
by size, bf16 and channels-last on GPUs); ``gem``: the GeM mode's epoch (pool described into the
mining actor, hard negatives, contrastive tuples from ``tuples``) and its held-out mAP; ``cgd``:
the CGD mode's epoch (P×K batches, batch-hard triplet plus label-smoothed cross-entropy) and its
held-out Recall@K; ``collective``: what the workers share (barriers, sums, progress).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from model.cli import location_problems

__all__ = ["TrainConf", "run"]

logger = logging.getLogger(__name__)

MODES = ("gem", "cgd")


@dataclass(frozen=True)
class TrainConf:
    """Settings of one training run; every field is a command-line flag."""

    images: str
    """images.parquet written by pipeline.ingest (the photos' bytes; CGD: their labels)."""
    output: str
    """Folder or s3:// prefix: the best checkpoint (model.pt, meta.json, whitening.npz),
    metrics.json, curves.png, and _SUCCESS (the settings) once the run is whole."""
    pairs: str | None = None
    """GeM mode: the folder written by pipeline.pairs (pairs.parquet, pool.parquet)."""
    mode: Literal["gem", "cgd"] = "gem"
    """gem (SfM pairs, contrastive loss, mined negatives) or cgd (class labels)."""
    weights: str = "imagenet"
    """Start from ImageNet Lite0 (+ GeM, or + the CGD head), or from a checkpoint directory."""
    name: str = "cirray-train"
    storage_path: str | None = None
    """Ray Train's storage (local or s3://); default OUTPUT/ray. Same name + storage: resume."""
    workers: int = 1
    use_gpu: bool = False
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
    # GeM mode
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
    (extract's size: the epoch is chosen by how it will be used; at 362 px the ranking of
    epochs differed). At the training size one description an epoch serves mining too."""
    whiten: bool = True
    """After training, learn Lw from the training clusters' pairs → OUTPUT/whitening.npz."""
    whiten_size: int = 1024
    """Longest side of the descriptors Lw is learned on (extract's default)."""
    whiten_shrinkage: float | None = None
    """Lw's shrinkage toward the identity in [0, 1] (0: the paper's Lw); unset: chosen by
    cross-validation over the training clusters (pipeline.whiten's --shrinkage)."""
    whiten_dim: int | None = None
    """Lw's output size; unset: chosen by the same cross-validation."""
    keep_whitening: Literal["if-better", "always"] = "if-better"
    """Store Lw only when it does not lower the held-out clusters' mAP at --whiten-size."""
    fold_whitening: bool = False
    """Start from --weights' whitening.npz folded into the head's FC layer (W = P, b = −P m)."""
    # CGD mode
    label_column: str = "auto"
    """The images.parquet column naming each photo's class: label, scene (a folder per class
    ingests as scenes), or auto (label where photos have one, else scene)."""
    classes_per_batch: int = 8
    """P of the P×K batches, per worker."""
    photos_per_class: int = 4
    """K of the P×K batches."""
    label_smoothing: float = 0.1
    temperature: float = 0.5
    cgd_descriptors: str = "SG"
    cgd_dim: int = 1536

    def settings(self) -> dict[str, Any]:
        """The fields with each mode's defaults filled in (what the workers run with)."""
        gem = self.mode == "gem"
        return {
            **asdict(self),
            "margin": self.margin if self.margin is not None else (0.7 if gem else 0.1),
            "image_size": self.image_size or (362 if gem else 224),
            "val_size": self.val_size or self.whiten_size,
        }


# ---------------------------------------------------------------------------------------------
# The worker's side


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker (``config``: the settings, the mode's data, the mining actor)."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from ray.train import Checkpoint

    from model.networks import freeze_trunk, parameter_groups, save_network
    from pipeline.train.images import resolve_precision

    conf = config["conf"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    print(f"cirray-train {conf['name']} rank {rank} of {world} pid {os.getpid()}", flush=True)
    device = ray.train.torch.get_device()
    precision = resolve_precision(conf["precision"], device, conf["device_batch"])
    mode = _epochs_class(conf["mode"])(conf, config["data"], precision, device, rank, world)
    torch.manual_seed(conf["seed"])
    net = initial_network(conf, getattr(mode, "num_classes", 0)).to(device)
    if conf["trainable_stages"] is not None:
        freeze_trunk(net, conf["trainable_stages"])
    if precision.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(
        parameter_groups(net, conf["lr"], conf["weight_decay"]), lr=conf["lr"]
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=conf["lr_decay"])
    start_epoch, steps, start = 1, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "train_state.pt", map_location=device)
            net.load_state_dict(torch.load(Path(folder) / "model.pt", map_location=device))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, steps, start = state["epoch"] + 1, state["steps"], state["start"]
    else:  # epoch 0: the network before any step (every worker describes, rank 0 scores)
        start = mode.validate(net, 1)
    model = net
    if world > 1:
        # GeM mode groups each worker's images by size, so workers make different numbers of
        # forward passes per step: DDP must not broadcast buffers in each one (a collective the
        # others would never join). Frozen BatchNorm has no buffers to keep in step anyway; CGD's
        # square photos in equal blocks give every worker the same passes.
        kwargs = {"forward_sync_buffers": conf["mode"] == "cgd" and not conf["freeze_bn"]}
        model = ray.train.torch.prepare_model(net, parallel_strategy_kwargs=kwargs)
    rate = "tuples_per_s" if conf["mode"] == "gem" else "images_per_s"

    for epoch in range(start_epoch, conf["epochs"] + 1):
        started = time.perf_counter()
        done = mode.epoch(model, net, optimizer, epoch)
        scheduler.step()
        steps += done["steps"]
        figures = mode.validate(net, epoch + 1 if epoch < conf["epochs"] else None)
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch, "loss": done["loss"], "seconds": seconds,
                   rate: done["items"] / seconds, "steps": steps, "start": start,
                   "steps_seconds": done["steps_seconds"], **figures}  # fmt: skip
        if rank != 0:
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as folder:
            save_network(net, folder)
            mode.add_to_checkpoint(Path(folder))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "epoch": epoch, "steps": steps, "start": start},
                       Path(folder) / "train_state.pt")  # fmt: skip
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def _epochs_class(mode: str) -> Any:
    if mode == "gem":
        from pipeline.train.gem import GemEpochs

        return GemEpochs
    from pipeline.train.cgd import CgdEpochs

    return CgdEpochs


def initial_network(conf: dict[str, Any], num_classes: int = 0) -> Any:
    """The network a run starts from: ImageNet Lite0 with the mode's head, or ``--weights``'
    checkpoint (its Lw folded into the head with ``--fold-whitening``)."""
    from model.networks import NetworkMeta, build_network, fold_whitening, load_network

    if conf["weights"] == "imagenet":
        if conf["mode"] == "cgd":
            meta = NetworkMeta(backbone="efficientnet_lite0", head="cgd",
                               descriptors=conf["cgd_descriptors"], dim=conf["cgd_dim"],
                               num_classes=num_classes)  # fmt: skip
        else:
            meta = NetworkMeta(backbone="efficientnet_lite0", pooling="gem", p=3.0, learn_p=True)
        return build_network(meta, "imagenet")
    net = load_network(conf["weights"])
    if conf["mode"] == "cgd" and (net.meta.head != "cgd" or net.meta.num_classes != num_classes):
        raise ValueError(
            f"--weights {conf['weights']} is a {net.meta.head} network with "
            f"{net.meta.num_classes} classes; CGD mode here needs a CGD head with {num_classes}"
        )
    if conf["fold_whitening"]:
        from model import storage
        from model.whitening import load_whitening
        from model.whitening_fit import WHITENING_FILE

        lw = storage.join(conf["weights"], WHITENING_FILE)
        if not storage.is_file(lw):
            raise ValueError(f"--fold-whitening: {conf['weights']} has no {WHITENING_FILE}")
        params = load_whitening(lw)
        net = fold_whitening(net, params.m, params.P)
    return net


# ---------------------------------------------------------------------------------------------
# The driver's side


def _check(conf: TrainConf) -> None:
    from pipeline.train.images import PRECISIONS

    problems = []
    names = ("workers", "epochs", "nnum", "queries", "tuples_per_step", "classes_per_batch",
             "photos_per_class", "whiten_size", "cgd_dim")  # fmt: skip
    for name in names:
        if getattr(conf, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    if conf.mode not in MODES:
        problems.append(f"--mode {conf.mode!r}: use gem or cgd")
    if conf.mode == "gem" and not conf.pairs:
        problems.append("--pairs is needed in GeM mode (the folder pipeline.pairs wrote)")
    if conf.mode == "gem" and conf.tuples_per_step < conf.workers:
        problems.append(f"--tuples-per-step {conf.tuples_per_step} must be at least --workers "
                        f"{conf.workers} (every worker computes a share of each step)")  # fmt: skip
    if conf.mode == "cgd" and conf.photos_per_class < 2:
        problems.append("--photos-per-class must be at least 2 (a positive in every batch)")
    if conf.precision not in PRECISIONS:
        problems.append(f"--precision {conf.precision!r}: use one of {', '.join(PRECISIONS)}")
    if conf.lr <= 0:
        problems.append(f"--lr must be positive, not {conf.lr}")
    if not 0 < conf.held_out < 1:
        problems.append(f"--held-out is a share in (0, 1), not {conf.held_out}")
    if conf.val_size is not None and conf.val_size < 64:
        problems.append(f"--val-size must be at least 64, not {conf.val_size}")
    if conf.image_size is not None and conf.image_size < 64:
        problems.append(f"--image-size must be at least 64, not {conf.image_size}")
    if conf.pool_size is not None and conf.pool_size < 2:
        problems.append(f"--pool-size must be at least 2, not {conf.pool_size}")
    if conf.whiten_shrinkage is not None and not 0 <= conf.whiten_shrinkage <= 1:
        problems.append(f"--whiten-shrinkage is a share in [0, 1], not {conf.whiten_shrinkage}")
    if conf.whiten_dim is not None and conf.whiten_dim < 1:
        problems.append(f"--whiten-dim must be at least 1, not {conf.whiten_dim}")
    if conf.trainable_stages is not None:
        stages = _trunk_stages(conf.weights)
        if not 0 <= conf.trainable_stages <= stages:
            problems.append(f"--trainable-stages {conf.trainable_stages}: the trunk of "
                            f"--weights {conf.weights} has {stages} stages")  # fmt: skip
    if conf.margin is not None and conf.margin <= 0:
        problems.append(f"--margin must be positive, not {conf.margin}")
    if conf.fold_whitening:
        from model import storage
        from model.whitening_fit import WHITENING_FILE

        if conf.weights == "imagenet":
            problems.append("--fold-whitening needs --weights: a checkpoint with a whitening.npz")
        elif not storage.is_file(storage.join(conf.weights, WHITENING_FILE)):
            problems.append(f"--fold-whitening: {conf.weights} has no {WHITENING_FILE}")
    locations = {"images": conf.images, "output": conf.output,
                 **({"pairs": conf.pairs} if conf.pairs else {}),
                 **({"storage_path": conf.storage_path} if conf.storage_path else {})}  # fmt: skip
    problems += location_problems(**locations)
    if not problems:
        from pipeline.ingest import read_images

        try:  # the workers read it; a wrong path is named here, not retried as a failure there
            read_images(conf.images, ["image_id"])
        except (OSError, ValueError) as err:
            problems.append(f"--images: {err}")
    if problems:
        raise ValueError("\n".join(problems))


def _trunk_stages(weights: str) -> int:
    """How many stages the trunk that training starts from has (0 for a missing checkpoint:
    named apart)."""
    from model import storage
    from model.backbones import build_backbone

    name = "efficientnet_lite0"
    if weights != "imagenet":
        try:
            name = json.loads(storage.read_text(storage.join(weights, "meta.json")))["backbone"]
        except (OSError, ValueError, KeyError):
            return 0
    return len(build_backbone(name, None).stages())


def _mode_data(conf: TrainConf) -> dict[str, Any]:
    """What the workers of ``conf.mode`` train on (read once, on the driver)."""
    if conf.mode == "gem":
        from model.training_set import read_training_set
        from model.whitening_fit import read_whitening_pairs

        return {"training_set": read_training_set(conf.pairs),
                "whitening_pairs": read_whitening_pairs(conf.pairs)}  # fmt: skip
    from pipeline.ingest import read_images

    columns = ["label", "scene"] if conf.label_column == "auto" else [conf.label_column]
    try:
        table = read_images(conf.images, ["image_id", *columns], ok_only=True)
    except ValueError as err:
        raise ValueError(f"--label-column {conf.label_column!r}: {err}") from err
    ids = table.column("image_id").to_pylist()
    for column in columns:
        kept = [(i, c) for i, c in zip(ids, table.column(column).to_pylist(), strict=True) if c]
        if kept:
            logger.info("CGD classes from the %s column: %d photos", column, len(kept))
            return {"image_ids": [i for i, _ in kept], "labels": [c for _, c in kept]}
    raise ValueError(f"--images {conf.images}: no photo has a {' or '.join(columns)}")


def run(conf: TrainConf) -> str:
    """Train; returns ``OUTPUT``, which holds the best epoch's checkpoint."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _check(conf)
    conf = _with_absolute_paths(conf)
    if _is_done(conf):
        logger.info("%s holds this run's result already; skipping", conf.output)
        return conf.output.rstrip("/")
    data = _mode_data(conf)
    num_classes = 0
    if conf.mode == "cgd":
        from pipeline.train.cgd import split_classes

        train_rows, _ = split_classes(np.asarray(data["labels"]), conf.held_out, conf.seed)
        num_classes = len(set(np.asarray(data["labels"])[train_rows].tolist()))
        if num_classes < conf.classes_per_batch * conf.workers:
            raise ValueError(
                f"{num_classes} training classes: a step's P×K batch needs --classes-per-batch "
                f"{conf.classes_per_batch} × --workers {conf.workers} = "
                f"{conf.classes_per_batch * conf.workers} of them; ask for fewer"
            )
    if not ray.is_initialized():
        ray.init()
    storage_path = conf.storage_path or _default_storage(conf.output)
    actors = []
    if conf.mode == "gem":
        from cluster.mining import mining_actor

        actors.append(mining_actor(num_cpus=0, gpu=conf.use_gpu))
        data["mining"] = actors[-1]
        settings = conf.settings()
        if settings["val_size"] != settings["image_size"]:  # the held-out vectors' mailbox
            actors.append(mining_actor(num_cpus=0, gpu=False))
            data["validation"] = actors[-1]
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"conf": conf.settings(), "data": data},
        scaling_config=ScalingConfig(num_workers=conf.workers, use_gpu=conf.use_gpu),
        run_config=RunConfig(
            name=conf.name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=conf.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        for actor in actors:
            ray.kill(actor)
    with tempfile.TemporaryDirectory(prefix="cirray-train-") as staging:
        _finish(conf, result, Path(staging), data, num_classes)
        _publish(Path(staging), conf)
    return conf.output.rstrip("/")


def _with_absolute_paths(conf: TrainConf) -> TrainConf:
    """``conf`` with its local paths absolute: Ray Train's workers do not run in the driver's
    folder, so ``--images run/images.parquet`` must reach them as the driver means it.
    ``--weights`` changes only when it names an existing path (not ``imagenet``)."""
    from dataclasses import replace

    from model import storage

    def absolute(uri: str | None, must_exist: bool = False) -> str | None:
        if uri is None or storage.is_remote(uri):
            return uri
        path = storage.local_path(uri)
        return uri if must_exist and not path.exists() else str(path.resolve())

    return replace(conf, pairs=absolute(conf.pairs), images=absolute(conf.images),
                   output=absolute(conf.output), storage_path=absolute(conf.storage_path),
                   weights=absolute(conf.weights, must_exist=True))  # fmt: skip


def _default_storage(output: str) -> str:
    """Ray Train's storage when ``--storage-path`` is not given: ``OUTPUT/ray``."""
    from model import storage

    return (
        storage.join(output, "ray")
        if storage.is_remote(output)
        else str((Path(output) / "ray").resolve())
    )


def _is_done(conf: TrainConf) -> bool:
    """Whether ``OUTPUT`` holds a finished run of exactly these settings (its marker)."""
    from model import storage

    marker = storage.join(conf.output, storage.SUCCESS)
    try:
        return json.loads(storage.read_text(marker)) == conf.settings()
    except (FileNotFoundError, ValueError):
        return False


def _publish(staging: Path, conf: TrainConf) -> None:
    """``staging``'s files into ``OUTPUT`` (local or ``s3://``), beside Ray's storage there.

    The marker goes first and comes back last with the run's settings; ``meta.json``, which
    marks a checkpoint, is removed before and written after the weights and Lw it describes: a
    reader never pairs an old ``meta.json`` with new weights, nor sees a half-written output
    that looks whole.
    """
    from model import storage
    from model.whitening_fit import WHITENING_FILE

    out = conf.output.rstrip("/")
    storage.remove(storage.join(out, storage.SUCCESS))
    for stale in ("meta.json", "model.pt", WHITENING_FILE):
        storage.remove(storage.join(out, stale))
    files = sorted(staging.iterdir(), key=lambda f: (f.name == "meta.json", f.name))
    for path in files:
        storage.write_bytes(storage.join(out, path.name), path.read_bytes())
    storage.write_text(storage.join(out, storage.SUCCESS), json.dumps(conf.settings()))


def _finish(conf: TrainConf, result: Any, target: Path, data: dict[str, Any],
            num_classes: int) -> None:  # fmt: skip
    """The best epoch's checkpoint, its Lw, ``metrics.json`` and ``curves.png`` into the local
    folder ``target``."""
    score = _epochs_class(conf.mode).score
    history = _history(result)
    scored = [h for h in history if h.get(score) is not None]
    # ties (Lw can saturate a small held-out set) go to the better plain network, then the
    # earlier epoch
    best = max(scored, key=lambda h: (_handed_over(conf, h, score), h[score], -h["epoch"]))
    for h in history:
        h["best"] = h["epoch"] == best["epoch"]
    if best["epoch"] == 0:
        logger.warning("no epoch beat the network it started from; keeping that one")
        import torch

        from model.networks import save_network

        torch.manual_seed(conf.seed)  # the workers' start, head included
        save_network(initial_network(conf.settings(), num_classes), target)
    else:
        checkpoint = next(c for c, m in result.best_checkpoints if m["epoch"] == best["epoch"])
        with checkpoint.as_directory() as folder:
            shutil.copy2(Path(folder) / "model.pt", target / "model.pt")
            shutil.copy2(Path(folder) / "meta.json", target / "meta.json")
    payload: dict[str, Any] = {"settings": conf.settings(), "epochs": history,
                               "best_epoch": best["epoch"], "score": score,
                               "selected_by": _selection(conf, score)}  # fmt: skip
    if conf.mode == "gem" and conf.whiten:
        payload["whitening"] = _learn_whitening(conf, target, data, result, best)
    (target / "metrics.json").write_text(json.dumps(payload, indent=2))
    kept = _handed_over(conf, best, score)
    _curves(history, target / "curves.png", score, kept)
    start = history[0] if history[0].get(score) is not None else None
    logger.info("kept epoch %d: %s %.4f (epoch 0: %s) → %s", best["epoch"],
                payload["selected_by"], kept, start and round(_handed_over(conf, start, score), 4),
                conf.output)  # fmt: skip


def _selection(conf: TrainConf, score: str) -> str:
    """How the kept epoch is chosen: by the figure of what the run hands over."""
    if conf.mode != "gem" or not conf.whiten:
        return score
    return "val_map_lw" if conf.keep_whitening == "always" else "max(val_map, val_map_lw)"


def _handed_over(conf: TrainConf, epoch: dict[str, Any], score: str) -> float:
    """``epoch``'s held-out figure as the run would hand it over: with the Lw its validation
    learned when the run keeps one (``--keep-whitening always``, or ``if-better`` where it
    raises the figure), so that an epoch is not kept for a plain figure its Lw undoes."""
    plain, lw = epoch[score], epoch.get("val_map_lw")
    if conf.mode != "gem" or not conf.whiten or lw is None:
        return plain
    return lw if conf.keep_whitening == "always" else max(plain, lw)


def _learn_whitening(conf: TrainConf, target: Path, data: dict[str, Any], result: Any,
                     best: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Lw of the best network from the training clusters' whitening pairs, over its
    descriptors at ``--whiten-size``, into ``target/whitening.npz``; returns what it learned
    from and the held-out clusters' mAP at that size without and with it. The best epoch's
    validation learned it already when it ran at that size (its checkpoint holds it);
    otherwise the best network describes the collection at that size here."""
    from model.whitening import load_whitening, save_whitening
    from model.whitening_fit import LW_META, WHITENING_FILE

    stored = None
    if conf.settings()["val_size"] == conf.whiten_size and best["epoch"] > 0:
        checkpoint = next(c for c, m in result.best_checkpoints if m["epoch"] == best["epoch"])
        with checkpoint.as_directory() as folder:
            if (Path(folder) / WHITENING_FILE).is_file():
                stored = load_whitening(Path(folder) / WHITENING_FILE)
    if stored is not None:
        m, P = stored.m, stored.P
        how = {**stored.meta, "val_map": best["val_map"], "val_map_lw": best["val_map_lw"]}
    else:
        try:
            m, P, how = _whitening_at_size(conf, target, data)
        except ValueError as err:
            logger.warning("no whitening learned: %s", err)
            return {"learned": False, "reason": str(err)}
    found: dict[str, Any] = {"learned": True, **how, "max_size": conf.whiten_size}
    lower = found.get("val_map_lw", 1.0) < found.get("val_map", 0.0)
    found["kept"] = conf.keep_whitening == "always" or not lower
    if not found["kept"]:  # Lw from few pairs can overfit: scenes never seen decide
        logger.warning("Lw lowers the held-out mAP (%.4f → %.4f): not kept (--keep-whitening "
                       "always keeps it)", found["val_map"], found["val_map_lw"])  # fmt: skip
        return found
    lw_meta = {k: v for k, v in how.items() if k in LW_META}
    save_whitening(target / WHITENING_FILE, m, P, **lw_meta, pairs_uri=conf.pairs,
                   max_size=conf.whiten_size, network={"checkpoint": conf.output})  # fmt: skip
    return found


def _whitening_at_size(conf: TrainConf, target: Path,
                       data: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict]:  # fmt: skip
    """``held_out_whitening`` over the checkpoint in ``target``'s descriptors of the
    collection at ``--whiten-size`` (extract's own run)."""
    from model.descriptors import read_descriptors
    from model.whitening_fit import held_out_whitening
    from pipeline.extract import ExtractConf
    from pipeline.extract import run as extract

    with tempfile.TemporaryDirectory(prefix="cirray-lw-") as scratch:
        settings = ExtractConf(images=conf.images, output=f"{scratch}/descriptors",
                               weights=str(target), max_size=conf.whiten_size)  # fmt: skip
        desc = read_descriptors(extract(settings))
    return held_out_whitening(desc.image_ids, desc.vectors, data["training_set"],
                              data["whitening_pairs"], conf.held_out, conf.seed,
                              conf.whiten_shrinkage, conf.whiten_dim)  # fmt: skip


def _history(result: Any) -> list[dict[str, Any]]:
    """One row per epoch from the checkpoints' metrics (rank 0's), epoch 0 the start."""
    rows = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["epoch"])
    history = [{k: v for k, v in m.items() if k != "start"} for m in rows]
    if rows:
        history.insert(0, {"epoch": 0, "loss": None, "seconds": 0.0, "steps": 0,
                           **(rows[0].get("start") or {})})  # fmt: skip
    return history


def _curves(history: list[dict[str, Any]], path: Path, score: str, kept: float) -> None:
    """Loss and the held-out figures per epoch; a star at the kept epoch's handed-over figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    trained = [h for h in history if h["loss"] is not None]
    left.plot([h["epoch"] for h in trained], [h["loss"] for h in trained], "o-")
    left.set(xlabel="epoch", ylabel="loss", title="training loss")
    for key in sorted({k for h in history for k in h if k.startswith("val_")}):
        scored = [h for h in history if h.get(key) is not None]
        right.plot([h["epoch"] for h in scored], [h[key] for h in scored], "o-",
                   label=key.removeprefix("val_"))  # fmt: skip
    best = next(h for h in history if h["best"])
    right.plot([best["epoch"]], [kept], "r*", markersize=14, label="kept")
    right.set(xlabel="epoch", ylabel="held-out score", title="validation (never trained on)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
