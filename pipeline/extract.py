"""The extract stage: descriptors of every ingested photo, on a Ray Data actor pool.

    python -m pipeline.extract --images OUT/images.parquet --output OUT/descriptors

Ray Data reads the photo bytes that ingest kept, decodes and resizes them in CPU tasks
(``model.images``: a bad photo is a row with its reason, never a stop), and describes them on a
pool of actors that each hold the network once (``model.describer.Describer``; its
``model.extraction.describe_batch``: batched by size inside each block, channels-last, bf16
autocast and a GPU per actor where there are GPUs). Learned whitening is applied when the
network has it (a checkpoint directory with ``whitening.npz`` beside ``model.pt``).

Output: the descriptor table of ``model.descriptors`` (``image_id``, ``vector``, ``error``
parts, then ``manifest.json`` with network, settings, dimension, counts and failures, and
``_SUCCESS`` last), which ``model.descriptors.read_descriptors`` reads. A rerun of an
interrupted extraction describes only the photos not in its finished part files; a complete
output is skipped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from model import storage
from model.backbones import BackboneName
from model.cli import location_problems, run_cli
from model.describer import (
    Describer,
    NetworkSettings,
    decode_photo,
    is_checkpoint,
    load_extract_network,
)
from model.descriptors import DESCRIPTOR_MANIFEST
from model.images import BadImage
from model.pooling import PoolingName
from pipeline.ingest import read_images, read_images_dataset

__all__ = ["ExtractConf", "decode_batch", "network_settings", "run"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConf:
    """Settings of one extraction; every field is a command-line flag."""

    images: str
    """images.parquet written by pipeline.ingest (a path or s3:// URI)."""
    output: str
    """Folder or s3:// prefix for the descriptor parts and their manifest."""
    weights: str = "imagenet"
    """imagenet (the backbone's packaged ImageNet weights), a weights file, or a training
    checkpoint directory (model.pt + meta.json, and whitening.npz when it has one)."""
    backbone: BackboneName = "efficientnet_lite0"
    pooling: PoolingName = "gem"
    p: float = 3.0
    max_size: int = 1024
    """Longer side the network sees (never enlarged)."""
    scales: tuple[float, ...] = (1.0,)
    """1 0.7071 0.5 for the GeM paper's multi-scale descriptors."""
    actors: int | None = None
    """Describing actors: default one per GPU, or one on a machine without GPUs."""
    gpus_per_actor: float | None = None
    """Default: 1 when the cluster has GPUs, else 0."""
    threads_per_actor: int | None = None
    """Torch threads of an actor on a CPU: default every core of its machine (decoding shares
    them, as DataLoader workers do in one process); set it when several actors share one."""
    batch_size: int = 32
    """Photos per block handed to an actor (split by image size inside it)."""
    device_batch_size: int | None = None
    """Images per forward pass: default 64 on a GPU, 1 on a CPU."""
    decode_batch_size: int = 16


def network_settings(conf: ExtractConf) -> NetworkSettings:
    """The network of ``conf`` and how it sees a photo (``model.describer``)."""
    return NetworkSettings(
        weights=conf.weights,
        backbone=conf.backbone,
        pooling=conf.pooling,
        p=conf.p,
        max_size=conf.max_size,
        scales=tuple(conf.scales),
    )


def run(conf: ExtractConf) -> str:
    """Describe every photo of ``conf.images``; returns the output URI."""
    import ray

    started = time.perf_counter()
    _check(conf)
    out = conf.output.rstrip("/")
    if storage.is_complete(out):
        logger.info("%s is complete; skipping", out)
        return out
    duplicates, unusable = _duplicate_rows(conf.images)  # also checks images is whole
    network, settings = _network_identity(conf)
    if not ray.is_initialized():
        ray.init()
    done = _finished_ids(out)
    if done:
        logger.info("resuming: %d photos already described in %s", len(done), out)
    images = read_images_dataset(conf.images, ["image_id", "uri", "bytes", "error"])
    gpus = float(ray.cluster_resources().get("GPU", 0))
    per_actor = conf.gpus_per_actor if conf.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    actors = conf.actors or (max(1, int(gpus // max(per_actor, 1))) if per_actor else 1)
    # Decoding runs in tasks of its own, beside the actors: a task pool sized unlike the actor
    # pool keeps Ray Data from fusing it into them, where decoding and describing would take
    # turns instead of overlapping.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    decoded = images.map_batches(
        decode_batch,
        fn_kwargs={"max_size": conf.max_size, "skip_ids": done, "skip_rows": duplicates},
        batch_size=conf.decode_batch_size,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=max(cpus, actors + 1)),
    )
    described = decoded.map_batches(
        Describer,
        fn_constructor_kwargs={
            "settings": network_settings(conf),
            "device_batch_size": conf.device_batch_size,
            "threads_per_actor": conf.threads_per_actor,
        },
        batch_size=conf.batch_size,
        num_gpus=per_actor,
        compute=ray.data.ActorPoolStrategy(size=actors),
    )
    described.write_parquet(out)
    manifest = _manifest(out, conf, network, settings, time.perf_counter() - started)
    manifest["not_ingested"] = unusable
    storage.write_text(storage.join(out, DESCRIPTOR_MANIFEST), json.dumps(manifest, indent=2))
    storage.write_text(storage.join(out, storage.SUCCESS), "")
    logger.info(
        "described %d photos (%d failed) into %s in %.1f s",
        manifest["count"],
        len(manifest["failed"]),
        out,
        manifest["seconds"],
    )
    return out


def decode_batch(
    batch: Any,
    max_size: int,
    skip_ids: frozenset[str] | set[str] = frozenset(),
    skip_rows: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset(),
) -> dict[str, Any]:
    """Photo bytes → RGB ``uint8`` arrays at most ``max_size`` a side, or the reason why not.

    Rows that failed at ingest (reported there), rows of ``skip_ids`` (described by an earlier
    run) and ``skip_rows`` (``(image_id, uri)`` of a photo already met under another URI) are
    left out.
    """
    columns = {name: batch.column(name).to_pylist() for name in ("image_id", "uri", "bytes")}
    errors = (
        batch.column("error").to_pylist()
        if "error" in batch.column_names
        else [None] * batch.num_rows
    )
    ids: list[str] = []
    pixels: list[np.ndarray] = []
    reasons: list[str | None] = []
    rows = zip(columns["image_id"], columns["uri"], columns["bytes"], errors, strict=True)
    for image_id, uri, raw, error in rows:
        if error is not None or image_id in skip_ids or (image_id, uri) in skip_rows:
            continue
        image = BadImage("no photo bytes") if raw is None else decode_photo(raw, max_size)
        ids.append(image_id)
        if isinstance(image, BadImage):
            pixels.append(np.zeros((1, 1, 3), np.uint8))
            reasons.append(f"{uri}: {image.reason}")
        else:
            pixels.append(image)
            reasons.append(None)
    return {"image_id": np.array(ids, dtype=object), "pixels": pixels, "error": reasons}


def _buffer(uri: str) -> Any:
    import pyarrow as pa

    return pa.BufferReader(storage.read_bytes(uri))


def _check(conf: ExtractConf) -> None:
    problems = []
    if conf.max_size < 1:
        problems.append(f"--max-size must be at least 1, got {conf.max_size}")
    if not conf.scales or any(not 0 < s <= 4 for s in conf.scales):
        problems.append(f"--scales must be factors in (0, 4], got {list(conf.scales)}")
    if conf.actors is not None and conf.actors < 1:
        problems.append(f"--actors must be at least 1, got {conf.actors}")
    problems += location_problems(images=conf.images, output=conf.output)
    if problems:
        raise ValueError("\n".join(problems))


def _duplicate_rows(images: str) -> tuple[frozenset[tuple[str, str]], int]:
    """``(image_id, uri)`` of every row whose photo an earlier row already has (same bytes),
    and how many rows failed at ingest; reading ``images`` checks it is complete and whole."""
    table = read_images(images, ["image_id", "uri", "error"])
    seen: set[str] = set()
    duplicates = set()
    failed = 0
    columns = (table.column(c).to_pylist() for c in ("image_id", "uri", "error"))
    for image_id, uri, error in zip(*columns, strict=True):
        if error is not None:
            failed += 1
        elif image_id in seen:
            duplicates.add((image_id, uri))
        seen.add(image_id)
    return frozenset(duplicates), failed


def _finished_ids(out: str) -> set[str]:
    """Image ids in the readable part files of an unfinished earlier run."""
    import pyarrow.parquet as pq

    if not storage.exists(out):
        return set()
    done: set[str] = set()
    for part in storage.list_files(out, suffixes=(".parquet",)):
        try:
            done.update(pq.read_table(_buffer(part), columns=["image_id"]).column(0).to_pylist())
        except (OSError, ValueError) as err:  # a part cut short by the crash
            logger.warning("removing unreadable part %s: %s", part, err)
            storage.remove(part)
    return done


def _network_identity(conf: ExtractConf) -> tuple[dict[str, Any], dict[str, Any]]:
    """What made the descriptors, for the manifest; loads the network once to check it."""
    net, whitening = load_extract_network(network_settings(conf))
    if is_checkpoint(conf.weights):
        network = {
            "checkpoint": conf.weights,
            "model": storage.file_signature(storage.join(conf.weights, "model.pt")),
            "meta": asdict(net.meta),
        }
    else:
        network = {"weights": conf.weights, "meta": asdict(net.meta)}
    dim = whitening[1].shape[0] if whitening is not None else net.out_dim
    settings = {
        "max_size": conf.max_size,
        "scales": list(conf.scales),
        "whitening": whitening is not None,
        "exif_transpose": True,
        "dim": int(dim),
    }
    return network, settings


def _manifest(
    out: str, conf: ExtractConf, network: dict, settings: dict, seconds: float
) -> dict[str, Any]:
    import pyarrow.parquet as pq

    files, count, failed = [], 0, []
    for part in storage.list_files(out, suffixes=(".parquet",)):
        table = pq.read_table(_buffer(part), columns=["image_id", "error"])
        errors = table.column("error").to_pylist()
        count += sum(e is None for e in errors)
        failed += [e for e in errors if e is not None]
        files.append(part.rsplit("/", 1)[-1])
    return {
        "format": 1,
        "images": conf.images,
        "dim": settings["dim"],
        "count": count,
        "failed": failed,
        "network": network,
        "settings": settings,
        "files": files,
        "seconds": round(seconds, 2),
    }


if __name__ == "__main__":
    run_cli(run, ExtractConf)
