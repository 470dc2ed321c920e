"""The train stage: fine-tune the retrieval network on Ray Train, GeM or CGD mode.

    python -m pipeline.train --pairs OUT/pairs --images OUT/images.parquet --output OUT/train
    python -m pipeline.train --pairs retrieval-SfM-120k.pkl --images ims --output OUT/train
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

``--pairs`` may also be cnnimageretrieval-pytorch's published pairs file (a ``.pkl``, local or
``s3://``) with ``--images`` its ``ims`` folder or prefix (``pipeline.train.published``): its
``train`` split trains, its ``val`` split is exactly the held-out validation (``--held-out``
becomes that split's share), and what the trainer consumes is converted once under
``OUTPUT/published/`` (the photos' bytes copied once, resumable); the file's identity (the hash
of its bytes) is the output's ``pairs`` input. docs/training-published.md says more.

Every epoch each worker reports ``loss``, the validation figures, ``seconds`` and the run's rate
(tuples or images per second, all workers together); rank 0 attaches a checkpoint
(``model.checkpoint``, plus the optimizer's state to resume). A rerun with the same ``--name``
and storage resumes from the latest one; worker failures are retried (``--max-failures``). At
the end the best epoch's network (the off-the-shelf network is epoch 0; in GeM mode with
``--whiten``, best as handed over: with its validation's Lw where that is kept) is saved as the
checkpoint of ``OUTPUT`` (a folder or ``s3://`` prefix) with ``metrics.json`` (every epoch, the
best marked) and ``curves.png``; in GeM mode ``--whiten`` learns Lw from the training clusters'
whitening pairs over that network's descriptors at extraction size and saves it in the
checkpoint, which extract and evaluate apply, unless it lowers the held-out clusters' mAP
(``--keep-whitening``). ``--fold-whitening`` starts instead from a checkpoint's Lw folded into
the head's FC layer (W = P, b = −P m), to fine-tune the whitening end to end as the GeM paper
does.

The output's manifest (``tables.TRAIN_OUTPUT``) is written last: its fingerprint holds the
pairs', the images' and the start weights' identities and the settings that change the
network. A rerun with the same fingerprint skips; one with only ``--epochs`` raised trains on
from Ray Train's checkpoints; any other change stops with one line naming it, unless
``--overwrite`` (which starts the training again).

This module is the driver and the Ray Train loop; the worker side is one module per job:
``images``: photos to tensors, augmentation, the network run over many images at once (grouped
by size, bf16 and channels-last on GPUs); ``gem``: the GeM mode's epoch (pool described into the
mining actor, hard negatives, contrastive tuples from ``tuples``) and its held-out mAP; ``cgd``:
the CGD mode's epoch (P×K batches, batch-hard triplet plus label-smoothed cross-entropy) and its
held-out Recall@K; ``collective``: what the workers share (barriers, sums, progress).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray
import ray.train
import ray.train.torch
import torch
from matplotlib.figure import Figure
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cluster.mining import mining_actor
from cluster.resources import on_a_cluster, reserved_threads
from model import checkpoint, storage, tables
from model.backbones import build_backbone
from model.cli import location_problems, log_settings
from model.describer import Describer, NetworkSettings, decode_photo
from model.networks import (
    NetworkMeta,
    RetrievalNet,
    build_network,
    fold_whitening,
    freeze_trunk,
    parameter_groups,
)
from model.settings import raise_problems
from model.training_set import read_training_set
from model.whitening import WhiteningParams
from model.whitening_fit import LW_META, held_out_whitening, read_whitening_pairs
from pipeline.train.cgd import CgdEpochs, split_classes
from pipeline.train.conf import CgdPart, GemPart, LwPart, TrainConf
from pipeline.train.gem import GemEpochs
from pipeline.train.images import photo_bytes, resolve_precision
from pipeline.train.published import Published, is_published, prepare

__all__ = ["CgdPart", "GemPart", "LwPart", "TrainConf", "handed_over", "initial_network", "run"]

logger = logging.getLogger(__name__)

_START_IDENTITY = {
    "gem": "imagenet/efficientnet_lite0/gem/p3.0",
    "cgd": "imagenet/efficientnet_lite0/cgd",
}
"""The identity of the packaged start weights of each mode."""
_TRAIN_STATE = "train_state.pt"
"""The optimizer's state beside each epoch's checkpoint in Ray Train's storage."""


# ---------------------------------------------------------------------------------------------
# The worker's side


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker (``config``: the resolved ``TrainConf``, the mode's data, the mining
    actor)."""
    conf = config["conf"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    print(f"cirray-train {conf.name} rank {rank} of {world} pid {os.getpid()}", flush=True)
    device = ray.train.torch.get_device()
    precision = resolve_precision(conf.precision, device, conf.device_batch)
    mode = _epochs_class(conf.mode)(
        conf, config["data"], precision, device=device, rank=rank, world=world
    )
    torch.manual_seed(conf.seed)
    net = initial_network(conf, getattr(mode, "num_classes", 0)).to(device)
    if conf.trainable_stages is not None:
        freeze_trunk(net, conf.trainable_stages)
    if precision.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(parameter_groups(net, conf.lr, conf.weight_decay), lr=conf.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=conf.lr_decay)
    state = _restored(net, optimizer, scheduler, device=device)
    if state is None:  # epoch 0: the start network (every worker describes, rank 0 scores)
        state = {"epoch": 0, "steps": 0, "start": mode.validate(net, 1)}
    start_epoch, steps, start = state["epoch"] + 1, state["steps"], state["start"]
    model = net
    if world > 1:
        # GeM mode groups each worker's images by size, so workers make different numbers of
        # forward passes per step: DDP must not broadcast buffers in each one (a collective the
        # others would never join). Frozen BatchNorm has no buffers to keep in step anyway; CGD's
        # square photos in equal blocks give every worker the same passes.
        kwargs = {"forward_sync_buffers": conf.mode == "cgd" and not conf.freeze_bn}
        model = ray.train.torch.prepare_model(net, parallel_strategy_kwargs=kwargs)
    rate = "tuples_per_s" if conf.mode == "gem" else "images_per_s"

    for epoch in range(start_epoch, conf.epochs + 1):
        started = time.perf_counter()
        done = mode.epoch(model, net, optimizer, epoch=epoch)
        scheduler.step()
        steps += done["steps"]
        figures = mode.validate(net, epoch + 1 if epoch < conf.epochs else None)
        seconds = time.perf_counter() - started
        metrics = {
            "epoch": epoch,
            "loss": done["loss"],
            "seconds": seconds,
            rate: done["items"] / seconds,
            "steps": steps,
            "start": start,
            "steps_seconds": done["steps_seconds"],
            **figures,
        }
        if rank != 0:
            ray.train.report(metrics)
            continue
        state = {"epoch": epoch, "steps": steps, "start": start}
        _report_with_checkpoint(
            metrics, net, optimizer=optimizer, scheduler=scheduler, state=state, mode=mode
        )


def _restored(
    net: RetrievalNet, optimizer: Any, scheduler: Any, *, device: torch.device
) -> dict[str, Any] | None:
    """The state of the run's last checkpoint, loaded into ``net``, the optimizer and the
    scheduler: ``epoch``, ``steps``, ``start``; ``None`` when the run starts afresh."""
    saved = ray.train.get_checkpoint()
    if not saved:
        return None
    with saved.as_directory() as folder:
        state = torch.load(Path(folder) / _TRAIN_STATE, map_location=device)
        net.load_state_dict(checkpoint.load(folder, device=str(device)).network.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def _report_with_checkpoint(
    metrics: dict[str, Any],
    net: RetrievalNet,
    *,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    mode: Any,
) -> None:
    """Rank 0: the epoch's figures reported with its checkpoint (the network, the Lw its
    validation learned, and the optimizer's state to resume from)."""
    state = {**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    with tempfile.TemporaryDirectory() as folder:
        lw = mode.checkpoint_whitening()
        checkpoint.save(folder, net, lw[:2] if lw else None, whitening_meta=lw and lw[2])
        torch.save(state, Path(folder) / _TRAIN_STATE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _epochs_class(mode: str) -> Any:
    return GemEpochs if mode == "gem" else CgdEpochs


def initial_network(conf: TrainConf, num_classes: int = 0) -> RetrievalNet:
    """The network a run starts from: ImageNet Lite0 with the mode's head, or ``--weights``'
    checkpoint (its Lw folded into the head with ``--fold-whitening``)."""
    if conf.weights == "imagenet":
        if conf.mode == "cgd":
            meta = NetworkMeta(
                backbone="efficientnet_lite0",
                head="cgd",
                descriptors=conf.cgd.cgd_descriptors,
                dim=conf.cgd.cgd_dim,
                num_classes=num_classes,
            )
        else:
            meta = NetworkMeta(backbone="efficientnet_lite0", pooling="gem", p=3.0, learn_p=True)
        return build_network(meta, "imagenet")
    start = checkpoint.load(conf.weights)
    net = start.network.train()
    if conf.mode == "cgd" and (net.meta.head != "cgd" or net.meta.num_classes != num_classes):
        raise ValueError(
            f"--weights {conf.weights} is a {net.meta.head} network with "
            f"{net.meta.num_classes} classes; CGD mode here needs a CGD head with {num_classes}"
        )
    if conf.lw.fold_whitening:
        if start.whitening is None:
            raise ValueError(f"--fold-whitening: {conf.weights} has no learned whitening")
        net = fold_whitening(net, start.whitening.m, start.whitening.P)
    return net


# ---------------------------------------------------------------------------------------------
# The driver's side


def run(conf: TrainConf) -> str:
    """Train; returns ``OUTPUT``, which holds the best epoch's checkpoint."""
    from_pkl = conf.mode == "gem" and is_published(conf.pairs)
    _check(conf, from_pkl=from_pkl)
    conf = _with_absolute_paths(conf).resolved()
    published = None
    if from_pkl:  # cirtorch's pairs file: trained on as a pairs output made from it
        published = prepare(
            conf.pairs, conf.images, output=conf.output, seed=conf.seed, held_out=conf.held_out
        )
        conf = replace(
            conf, pairs=published.pairs, images=published.images, held_out=published.held_out
        )
    log_settings(logger, "train", conf.settings())
    out = conf.output
    inputs = _inputs(conf, published)
    settings = conf.content_settings()
    action = _plan(conf, inputs, settings)
    if action == "skip":
        logger.info("%s is complete; skipping", out)
        return out
    data = _mode_data(conf)
    num_classes = _num_classes(conf, data)
    result = _fit(conf, data)
    summary = _finish(conf, result, data, num_classes=num_classes)
    if published is not None:
        summary["published"] = published.details
    tables.TRAIN_OUTPUT.publish(out, inputs=inputs, settings=settings, details=summary)
    return out


def _inputs(
    conf: TrainConf, published: Published | None = None
) -> dict[str, tables.Manifest | str]:
    """What the run is made from: the images and pairs outputs (for cirtorch's pairs file,
    the file's identity), and the start weights."""
    inputs: dict[str, tables.Manifest | str] = {
        "images": tables.IMAGES_OUTPUT.manifest(conf.images)
    }
    if published is not None:
        inputs["pairs"] = published.identity
    elif conf.mode == "gem":
        inputs["pairs"] = tables.PAIRS_OUTPUT.manifest(conf.pairs)
    if checkpoint.is_checkpoint(conf.weights):
        inputs["start"] = checkpoint.identity(conf.weights)
    else:
        inputs["start"] = _START_IDENTITY[conf.mode]
    return inputs


def _plan(conf: TrainConf, inputs: dict[str, tables.Manifest | str], settings: dict) -> str:
    """``skip``; ``resume`` (train on from Ray Train's checkpoints of the run: a first or
    interrupted run, or the same one with ``--epochs`` raised); or ``restart`` (the output is
    replaced, and the run's checkpoints with it: other inputs, or ``--overwrite``).

    ``OutputChanged`` names any other change of settings."""
    identities = tables.identities(inputs)
    try:
        existing = tables.TRAIN_OUTPUT.existing(conf.output)
    except ValueError:  # unfinished: Ray Train's checkpoints resume it
        existing = None
    if existing is not None and _only_more_epochs(existing, identities, settings):
        logger.info(
            "%s: --epochs raised from %s; training on", conf.output, existing.settings["epochs"]
        )
        tables.TRAIN_OUTPUT.unpublish(conf.output)
        return "resume"
    action, _ = tables.TRAIN_OUTPUT.plan(
        conf.output, identities, settings, overwrite=conf.overwrite
    )
    if action == "skip":
        return "skip"
    if existing is None:
        return "resume"
    tables.TRAIN_OUTPUT.unpublish(conf.output)
    storage.remove(storage.join(conf.storage_path or _default_storage(conf.output), conf.name))
    return "restart"


def _only_more_epochs(existing: tables.Manifest, inputs: dict[str, str], settings: dict) -> bool:
    """Whether ``settings`` differ from the existing output's only by more epochs."""
    before = existing.settings
    return (
        existing.inputs == inputs
        and settings["epochs"] > before.get("epochs", settings["epochs"])
        and not existing.changed_settings({**settings, "epochs": before["epochs"]})
    )


def _num_classes(conf: TrainConf, data: dict[str, Any]) -> int:
    """CGD mode: the training classes (checked against a step's batch); GeM mode: 0."""
    if conf.mode != "cgd":
        return 0
    labels = np.asarray(data["labels"])
    train_rows, _ = split_classes(labels, conf.held_out, conf.seed)
    num_classes = len(set(labels[train_rows].tolist()))
    if num_classes < conf.cgd.classes_per_batch * conf.workers:
        raise ValueError(
            f"{num_classes} training classes: a step's P×K batch needs --classes-per-batch "
            f"{conf.cgd.classes_per_batch} × --workers {conf.workers} = "
            f"{conf.cgd.classes_per_batch * conf.workers} of them; ask for fewer"
        )
    return num_classes


def _fit(conf: TrainConf, data: dict[str, Any]) -> Any:
    """Ray Train's run of ``train_loop`` on ``conf.workers`` workers (the mining actors of the
    GeM mode beside them); its result."""
    if not ray.is_initialized():
        ray.init()
    actors = []
    if conf.mode == "gem":
        # Every actor reserves what it holds and uses: one that reserved nothing could land on
        # a head that takes no work, or take a GPU another reserved.
        multi_node = on_a_cluster()
        pool_bytes = _mining_memory(len(data["training_set"].image_ids)) if multi_node else None
        cpus = conf.mining_cpus if conf.mining_cpus is not None else (2.0 if multi_node else 0.0)
        actors.append(
            mining_actor(
                num_cpus=cpus,
                num_gpus=conf.mining_gpus,
                gpu=conf.mining_gpus > 0,
                memory=pool_bytes,
            )
        )
        data = {**data, "mining": actors[-1]}
        if conf.gem.val_size != conf.image_size:  # the held-out vectors' mailbox
            mailbox_cpus = 0.5 if multi_node else 0.0
            actors.append(mining_actor(num_cpus=mailbox_cpus, gpu=False, memory=pool_bytes))
            data["validation"] = actors[-1]
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"conf": conf, "data": data},
        scaling_config=ScalingConfig(num_workers=conf.workers, use_gpu=conf.use_gpu),
        run_config=RunConfig(
            name=conf.name,
            storage_path=conf.storage_path or _default_storage(conf.output),
            failure_config=FailureConfig(max_failures=conf.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    try:
        return trainer.fit()
    finally:
        for actor in actors:
            ray.kill(actor)


def _mining_memory(photos: int) -> int:
    """Bytes a mining actor reserves for an epoch's pool of ``photos``: their vectors (up to
    2048 floats) held as parts, gathered and indexed, plus the process itself."""
    return 3 * photos * 2048 * 4 + 512 * 2**20


def _check(conf: TrainConf, *, from_pkl: bool = False) -> None:
    """What the settings' own checks cannot see: the locations, the start weights and the
    images output (named here, not retried as a worker's failure there; with cirtorch's pairs
    file, ``--images`` is its photo folder, checked with the file)."""
    problems = []
    if conf.trainable_stages is not None:
        stages = _trunk_stages(conf.weights)
        if not 0 <= conf.trainable_stages <= stages:
            problems.append(
                f"--trainable-stages {conf.trainable_stages}: the trunk of "
                f"--weights {conf.weights} has {stages} stages"
            )
    lw = storage.join(conf.weights, checkpoint.WHITENING_FILE)
    if conf.lw.fold_whitening and conf.weights != "imagenet" and not storage.is_file(lw):
        problems.append(f"--fold-whitening: {conf.weights} has no learned whitening")
    locations = {
        "images": conf.images,
        "output": conf.output,
        **({"pairs": conf.pairs} if conf.pairs else {}),
        **({"storage_path": conf.storage_path} if conf.storage_path else {}),
    }
    problems += location_problems(**locations)
    if not problems and not from_pkl:
        try:
            tables.IMAGES_OUTPUT.manifest(conf.images)
        except (OSError, ValueError) as err:
            problems.append(f"--images: {err}")
    raise_problems(problems)


def _trunk_stages(weights: str) -> int:
    """How many stages the trunk that training starts from has (0 for a missing checkpoint:
    named apart)."""
    name = "efficientnet_lite0"
    if weights != "imagenet":
        try:
            name = checkpoint.read_meta(weights)["backbone"]
        except (OSError, ValueError, KeyError):
            return 0
    return len(build_backbone(name, None).stages())


def _mode_data(conf: TrainConf) -> dict[str, Any]:
    """What the workers of ``conf.mode`` train on (read once, on the driver)."""
    if conf.mode == "gem":
        return {
            "training_set": read_training_set(conf.pairs),
            "whitening_pairs": read_whitening_pairs(conf.pairs),
        }
    columns = ["label", "scene"] if conf.cgd.label_column == "auto" else [conf.cgd.label_column]
    try:
        table = tables.IMAGES.read(
            conf.images, ["image_id", *columns], filter=pc.field("error").is_null()
        )
    except ValueError as err:
        raise ValueError(f"--label-column {conf.cgd.label_column!r}: {err}") from err
    ids = table.column("image_id").to_pylist()
    for column in columns:
        kept = [(i, c) for i, c in zip(ids, table.column(column).to_pylist(), strict=True) if c]
        if kept:
            logger.info("CGD classes from the %s column: %d photos", column, len(kept))
            return {"image_ids": [i for i, _ in kept], "labels": [c for _, c in kept]}
    raise ValueError(f"--images {conf.images}: no photo has a {' or '.join(columns)}")


def _with_absolute_paths(conf: TrainConf) -> TrainConf:
    """``conf`` with its local paths resolved: Ray Train's workers do not run in the driver's
    folder, so ``--images run/images.parquet`` must reach them as the driver means it.
    ``--weights`` changes only when it names an existing path (not ``imagenet``)."""

    def absolute(uri: str | None, must_exist: bool = False) -> str | None:
        if uri is None or (must_exist and not storage.exists(uri)):
            return uri
        return tables.resolve(uri)

    return replace(
        conf,
        pairs=absolute(conf.pairs),
        images=absolute(conf.images),
        output=absolute(conf.output),
        storage_path=absolute(conf.storage_path),
        weights=absolute(conf.weights, must_exist=True),
    )


def _default_storage(output: str) -> str:
    """Ray Train's storage when ``--storage-path`` is not given: ``OUTPUT/ray``."""
    return storage.join(output, "ray")


def _finish(conf: TrainConf, result: Any, data: dict[str, Any], *, num_classes: int) -> dict:
    """The best epoch's network and its Lw saved as ``OUTPUT``'s checkpoint, with
    ``metrics.json`` and ``curves.png``; returns the run's summary (the manifest's details)."""
    score = _epochs_class(conf.mode).score
    history = _history(result)
    scored = [h for h in history if h.get(score) is not None]
    # ties (Lw can saturate a small held-out set) go to the better plain network, then the
    # earlier epoch
    best = max(scored, key=lambda h: (handed_over(conf, h, score), h[score], -h["epoch"]))
    for h in history:
        h["best"] = h["epoch"] == best["epoch"]
    net, stored = _best_network(conf, result, best, num_classes=num_classes)
    summary: dict[str, Any] = {
        "best_epoch": best["epoch"],
        "score": score,
        "selected_by": _selection(conf, score),
    }
    whitening = None
    if conf.mode == "gem" and conf.lw.whiten:
        summary["whitening"], whitening = _learn_whitening(conf, net, stored, data=data, best=best)
    summary["checkpoint"] = checkpoint.save(conf.output, net, whitening)
    payload = {"settings": conf.settings(), "epochs": history, **summary}
    storage.write_text(storage.join(conf.output, "metrics.json"), json.dumps(payload, indent=2))
    kept = handed_over(conf, best, score)
    storage.write_bytes(storage.join(conf.output, "curves.png"), _curves(history, score, kept))
    start = history[0] if history[0].get(score) is not None else None
    logger.info(
        "kept epoch %d: %s %.4f (epoch 0: %s) → %s",
        best["epoch"],
        summary["selected_by"],
        kept,
        start and round(handed_over(conf, start, score), 4),
        conf.output,
    )
    return {**summary, score: best[score]}


def _best_network(
    conf: TrainConf, result: Any, best: dict[str, Any], *, num_classes: int
) -> tuple[RetrievalNet, WhiteningParams | None]:
    """The network of the best epoch and the Lw its validation learned (when it did so at
    ``--whiten-size``); epoch 0 is the network the workers started from."""
    if best["epoch"] == 0:
        logger.warning("no epoch beat the network it started from; keeping that one")
        torch.manual_seed(conf.seed)  # the workers' start, head included
        return initial_network(conf, num_classes), None
    saved = next(c for c, m in result.best_checkpoints if m["epoch"] == best["epoch"])
    with saved.as_directory() as folder:
        loaded = checkpoint.load(folder)
    return loaded.network, loaded.whitening


def _selection(conf: TrainConf, score: str) -> str:
    """How the kept epoch is chosen: by the figure of what the run hands over."""
    if conf.mode != "gem" or not conf.lw.whiten:
        return score
    return "val_map_lw" if conf.lw.keep_whitening == "always" else "max(val_map, val_map_lw)"


def handed_over(conf: TrainConf, epoch: dict[str, Any], score: str) -> float:
    """``epoch``'s held-out figure as the run would hand it over: with the Lw its validation
    learned when the run keeps one (``--keep-whitening always``, or ``if-better`` where it
    raises the figure), so that an epoch is not kept for a plain figure its Lw undoes."""
    plain, lw = epoch[score], epoch.get("val_map_lw")
    if conf.mode != "gem" or not conf.lw.whiten or lw is None:
        return plain
    return lw if conf.lw.keep_whitening == "always" else max(plain, lw)


def _learn_whitening(
    conf: TrainConf,
    net: RetrievalNet,
    stored: WhiteningParams | None,
    *,
    data: dict[str, Any],
    best: dict[str, Any],
) -> tuple[dict[str, Any], WhiteningParams | None]:
    """Lw of the best network from the training clusters' whitening pairs, over its
    descriptors at ``--whiten-size``: what it learned from, the held-out clusters' mAP at that
    size without and with it, and the Lw to keep (``None`` when it is not kept). The best
    epoch's validation learned it already when it ran at that size (``stored``); otherwise the
    network describes the pool's photos at that size here."""
    if stored is not None:
        m, P = stored.m, stored.P
        how = {**stored.meta, "val_map": best["val_map"], "val_map_lw": best["val_map_lw"]}
    else:
        try:
            m, P, how = _whitening_at_size(conf, net, data)
        except ValueError as err:
            logger.warning("no whitening learned: %s", err)
            return {"learned": False, "reason": str(err)}, None
    found: dict[str, Any] = {"learned": True, **how, "max_size": conf.lw.whiten_size}
    lower = found.get("val_map_lw", 1.0) < found.get("val_map", 0.0)
    found["kept"] = conf.lw.keep_whitening == "always" or not lower
    if not found["kept"]:  # Lw from few pairs can overfit: scenes never seen decide
        logger.warning(
            "Lw lowers the held-out mAP (%.4f → %.4f): not kept (--keep-whitening always keeps it)",
            found["val_map"],
            found["val_map_lw"],
        )
        return found, None
    meta = {k: v for k, v in how.items() if k in LW_META}
    meta.update(
        pairs_uri=conf.pairs, max_size=conf.lw.whiten_size, network={"checkpoint": conf.output}
    )
    return found, WhiteningParams(m, P, meta)


def _whitening_at_size(
    conf: TrainConf, net: RetrievalNet, data: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``held_out_whitening`` over ``net``'s descriptors of the pool's photos at
    ``--whiten-size``, described as extract describes them (``model.describer``)."""
    pool = data["training_set"]
    with tempfile.TemporaryDirectory(prefix="cirray-lw-") as scratch:
        checkpoint.save(scratch, net)
        files = {
            str(path.relative_to(scratch)): path.read_bytes()
            for path in Path(scratch).rglob("*")
            if path.is_file()
        }
    # Described in a task of its own, as a training worker would: the driver may run on a head
    # that takes no work, and the network travels in the task's arguments (the object store),
    # never as a path on the driver's disk.
    task = ray.remote(_describe_at_size).options(
        num_cpus=1, num_gpus=1 if conf.use_gpu else 0, max_retries=2
    )
    ids, vectors = ray.get(
        task.remote(files, conf.lw.whiten_size, conf.images, image_ids=pool.image_ids.tolist())
    )
    return held_out_whitening(
        ids,
        vectors,
        pool,
        pairs=data["whitening_pairs"],
        held_out=conf.held_out,
        seed=conf.seed,
        fit=conf.lw.fit,
    )


def _describe_at_size(
    files: dict[str, bytes], max_size: int, images: str, *, image_ids: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """In a Ray task: the checkpoint's ``files`` written to the task's own scratch, loaded as
    extract loads it, and the photos of ``image_ids`` described at ``max_size``."""
    with tempfile.TemporaryDirectory(prefix="cirray-lw-") as scratch:
        for name, data in files.items():
            target = Path(scratch) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        settings = NetworkSettings(weights=scratch, max_size=max_size)
        describer = Describer(settings, threads_per_actor=reserved_threads())
    return _describe_photos(describer, images, image_ids)


def _describe_photos(
    describer: Describer, images: str, image_ids: list[str], *, batch: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """``(image_ids, vectors)`` of the photos of ``image_ids`` that decode and describe."""
    found_ids: list[str] = []
    found: list[np.ndarray] = []
    names: list[str] = []
    pixels: list[np.ndarray] = []

    def flush() -> None:
        for image_id, vector in zip(names, describer.describe(pixels), strict=True):
            if vector is not None:
                found_ids.append(image_id)
                found.append(vector)
        names.clear()
        pixels.clear()

    for image_id, raw in photo_bytes(images, image_ids):
        photo = decode_photo(raw, describer.settings.max_size)
        if isinstance(photo, np.ndarray):
            names.append(image_id)
            pixels.append(photo)
        if len(pixels) == batch:
            flush()
    if pixels:
        flush()
    if not found:
        raise ValueError(f"no photo of {images} could be described")
    return np.array(found_ids, dtype=object), np.stack(found)


def _history(result: Any) -> list[dict[str, Any]]:
    """One row per epoch from the checkpoints' metrics (rank 0's), epoch 0 the start."""
    rows = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["epoch"])
    history = [{k: v for k, v in m.items() if k != "start"} for m in rows]
    if rows:
        history.insert(
            0,
            {"epoch": 0, "loss": None, "seconds": 0.0, "steps": 0, **(rows[0].get("start") or {})},
        )
    return history


def _curves(history: list[dict[str, Any]], score: str, kept: float) -> bytes:
    """A PNG of the loss and the held-out figures per epoch; a star at the kept epoch's
    handed-over figure."""
    fig = Figure(figsize=(9, 3.5))
    left, right = fig.subplots(1, 2)
    trained = [h for h in history if h["loss"] is not None]
    left.plot([h["epoch"] for h in trained], [h["loss"] for h in trained], "o-")
    left.set(xlabel="epoch", ylabel="loss", title="training loss")
    for key in sorted({k for h in history for k in h if k.startswith("val_")}):
        scored = [h for h in history if h.get(key) is not None]
        right.plot(
            [h["epoch"] for h in scored],
            [h[key] for h in scored],
            "o-",
            label=key.removeprefix("val_"),
        )
    best = next(h for h in history if h["best"])
    right.plot([best["epoch"]], [kept], "r*", markersize=14, label="kept")
    right.set(xlabel="epoch", ylabel="held-out score", title="validation (never trained on)")
    right.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
