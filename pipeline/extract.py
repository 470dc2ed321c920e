"""The extract stage: descriptors of every ingested photo, on a Ray Data actor pool.

    python -m pipeline.extract --images OUT/images.parquet --output OUT/descriptors

Ray Data reads the photo bytes that ingest kept (``model.tables.IMAGES``), decodes and resizes
them in CPU tasks (``model.images``: a bad photo is a row with its reason, never a stop), and
describes them on a pool of actors that each hold the network once
(``model.describer.Describer``; its ``model.extraction.describe_batch``: batched by size inside
each block, channels-last, bf16 autocast and a GPU per actor where there are GPUs). Learned
whitening is applied when the network has it (a checkpoint with whitening,
``model.checkpoint``).

Output: the descriptor table (``model.tables.DESCRIPTORS``: ``image_id``, ``vector``, ``error``
parts), then its manifest, published last: inputs the images output and the network's
identity, settings what changes a vector (longer side, scales, whitening, dimension), details
the network, counts and failures, which ``model.descriptors.read_descriptors`` reads.

Resume by fingerprint: the same images and network with the same settings are skipped; new
photos in the images output (same network and settings) describe only the photos without a
row yet, keep the rows of photos still there and drop those of photos gone; another network
or setting stops with one line naming it, unless ``--overwrite`` (which replaces the output).
An interrupted run describes only the photos not in its part files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cluster.resources import check_schedulable, is_multi_node, reachable_resources
from model import checkpoint, storage, tables
from model.cli import FlatFlags, location_problems, log_settings, run_cli
from model.describer import (
    Describer,
    NetworkSettings,
    decode_photo,
    load_extract_network,
    network_identity,
)
from model.images import BadImage
from model.settings import raise_problems
from model.tables import DESCRIPTORS, DESCRIPTORS_OUTPUT, IMAGES, IMAGES_OUTPUT, Manifest

__all__ = [
    "DescriberPool",
    "ExtractConf",
    "decode_batch",
    "decode_memory",
    "describer_pool",
    "parse_resources",
    "run",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConf(FlatFlags):
    """Settings of one extraction; every field is a command-line flag."""

    images: str
    """The images output written by pipeline.ingest (its folder, a path or s3:// URI)."""
    output: str
    """Folder or s3:// prefix for the descriptor parts and their manifest."""
    network: NetworkSettings = field(default_factory=NetworkSettings)
    """The network and how it sees a photo (flags --weights, --backbone, --pooling, --p,
    --max-size, --scales): --weights is imagenet, a weights file, or a training checkpoint
    (``model.checkpoint``, with its whitening when it has one)."""
    actors: int | None = None
    """Most describing actors: the pool starts at one and grows while photos wait, up to one
    per GPU the cluster can reach (its autoscaler's node types count), or on CPUs one per
    --cpus-per-actor of them."""
    gpus_per_actor: float | None = None
    """Default: 1 when the cluster has or can start GPU nodes, else 0 (describe on CPUs)."""
    cpus_per_actor: float | None = None
    """CPUs each describing actor reserves: default 1 beside a GPU, 2 on CPUs (its torch
    threads; 1 on a cluster of fewer than 4); decoding runs in 1-CPU tasks beside them."""
    actor_resources: tuple[str, ...] = ()
    """Custom Ray resources each describing actor asks for, as NAME=AMOUNT (a node type's own
    resource, e.g. accelerator=1): the actors go only to nodes of that type, and the pool
    grows to as many as the cluster can reach of it."""
    threads_per_actor: int | None = None
    """Torch threads of an actor on a CPU: default the CPUs it reserved on a cluster of several
    nodes, every core on one machine (its decoding tasks and it share the cores, as on a
    laptop; one thread would leave a core idle while a batch is described)."""
    batch_size: int = 32
    """Photos per block handed to an actor (split by image size inside it)."""
    device_batch_size: int | None = None
    """Images per forward pass: default 64 on a GPU, 1 on a CPU."""
    decode_batch_size: int = 16
    overwrite: bool = False
    """Replace an output made with another network or settings (else the run stops)."""


@dataclass(frozen=True)
class _Network:
    """The network as the output records it: its identity, its description and settings."""

    identity: str
    description: dict[str, Any]
    settings: dict[str, Any]


@dataclass(frozen=True)
class _Photos:
    """What the images output asks of this run."""

    usable: frozenset[str]
    """image_ids of the usable photos."""
    duplicates: frozenset[tuple[str, str]]
    """``(image_id, uri)`` of rows whose photo an earlier row already has."""
    not_ingested: int


def run(conf: ExtractConf) -> str:
    """Describe every photo of ``conf.images``; returns the output URI."""
    started = time.perf_counter()
    _check(conf)
    log_settings(logger, "extract", conf)
    out = tables.resolve(conf.output)
    images = IMAGES_OUTPUT.manifest(conf.images)
    network = _network_identity(conf)
    inputs = {"images": images, "network": network.identity}
    action, previous = _plan(conf, out, inputs, network=network)
    if action == "skip":
        logger.info("%s is complete; skipping", out)
        return out
    photos = _photos(images)
    done = _described_ids(out, previous, photos.usable)
    DESCRIPTORS_OUTPUT.unpublish(out)
    if done:
        logger.info("resuming: %d photos already described in %s", len(done), out)
    _describe(conf, out, photos, done=done)
    manifest = DESCRIPTORS_OUTPUT.publish(
        out,
        inputs=inputs,
        settings=network.settings,
        details=_details(
            out, network, photos, reused=len(done), seconds=time.perf_counter() - started
        ),
    )
    details = manifest.details
    logger.info(
        "described %d photos (%d failed) into %s in %.1f s",
        details["count"],
        len(details["failed"]),
        out,
        details["seconds"],
    )
    return out


def _plan(
    conf: ExtractConf, out: str, inputs: dict[str, Any], *, network: _Network
) -> tuple[str, Manifest | None]:
    """What this run does at ``out`` (``Output.plan``: another network is never an update);
    an output replaced (``--overwrite``) is cleared first."""
    action, previous = DESCRIPTORS_OUTPUT.plan(
        out, inputs, network.settings, overwrite=conf.overwrite, fixed=("network",)
    )
    replaced = action == "new" and storage.exists(DESCRIPTORS_OUTPUT.manifest_uri(out))
    if replaced and conf.overwrite:
        logger.info("replacing %s (--overwrite)", out)
        DESCRIPTORS_OUTPUT.clear(out)
        previous = None
    return action, previous


def _describe(conf: ExtractConf, out: str, photos: _Photos, *, done: set[str]) -> None:
    """Describe the usable photos not in ``done`` on Ray Data, written as parts into ``out``."""
    import ray  # the driver's cluster, joined only when there is work

    if not photos.usable - done:
        return
    if not ray.is_initialized():
        ray.init()
    pool = describer_pool(conf, reachable_resources(), photos=len(photos.usable - done))
    check_schedulable(
        "--cpus-per-actor, --gpus-per-actor, --actor-resources",
        {"CPU": pool.cpus, "GPU": pool.gpus, **pool.resources},
    )
    logger.info(
        "describing on %s actors (%s GPU, %s CPU each), decoding in 1-CPU tasks",
        f"1..{pool.max_actors}",
        pool.gpus,
        pool.cpus,
    )
    dataset = IMAGES.ray_dataset(conf.images, ["image_id", "uri", "bytes", "error"])
    # Decoding runs in tasks of its own beside the actors, each declaring the memory its
    # decoded batch takes: remote arguments unlike the actors' keep Ray Data from fusing it
    # into them, where decoding and describing would take turns instead of overlapping.
    decoded = dataset.map_batches(
        decode_batch,
        fn_kwargs={
            "max_size": conf.network.max_size,
            "skip_ids": done,
            "skip_rows": photos.duplicates,
        },
        batch_size=conf.decode_batch_size,
        batch_format="pyarrow",
        num_cpus=1,
        memory=decode_memory(conf.decode_batch_size, conf.network.max_size),
    )
    described = decoded.map_batches(
        Describer,
        fn_constructor_kwargs={
            "settings": conf.network,
            "device_batch_size": conf.device_batch_size,
            "threads_per_actor": conf.threads_per_actor
            or (max(1, int(pool.cpus)) if is_multi_node() else None),
        },
        batch_size=conf.batch_size,
        num_gpus=pool.gpus,
        num_cpus=pool.cpus,
        resources=pool.resources or None,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool.max_actors),
        # Workers of their own: a pooled worker that decoded photos before torch came in
        # (OpenCV's libraries first) cannot load torch's MKL.
        runtime_env={"env_vars": {"CIRRAY_WORKER": "describer"}},
    )
    described.write_parquet(out)


@dataclass(frozen=True)
class DescriberPool:
    """What each describing actor reserves and how many the pool may grow to."""

    gpus: float
    cpus: float
    max_actors: int
    resources: dict[str, float] = field(default_factory=dict)


def describer_pool(conf: ExtractConf, reachable: dict[str, float], *, photos: int) -> DescriberPool:
    """The describing actors for a cluster that can reach ``reachable`` resources
    (``cluster.resources.reachable_resources``: its autoscaler's node types count, so a cluster
    scaled to zero still gets GPU actors, whose demand starts the GPU nodes)."""
    gpus_reachable = reachable.get("GPU", 0.0)
    gpus = conf.gpus_per_actor if conf.gpus_per_actor is not None else float(gpus_reachable > 0)
    cpus_reachable = reachable.get("CPU", 0.0)
    if conf.cpus_per_actor is not None:
        cpus = conf.cpus_per_actor
    else:  # a small machine keeps a CPU for decoding beside one actor
        cpus = 1.0 if gpus or cpus_reachable < 4 else 2.0
    # one actor per GPU; on CPUs, leave one to decoding
    most = int(gpus_reachable // gpus) if gpus else int((cpus_reachable - 1) // (cpus or 1.0))
    resources = parse_resources(conf.actor_resources)
    for name, amount in resources.items():  # no more than the nodes carrying them can take
        most = min(most, int(reachable.get(name, 0.0) // amount))
    batches = -(-photos // conf.batch_size)  # no more actors than blocks to describe
    return DescriberPool(gpus, cpus, max(1, min(conf.actors or most, batches)), resources)


def parse_resources(flags: tuple[str, ...]) -> dict[str, float]:
    """``("accelerator=1", …)`` → ``{"accelerator": 1.0, …}``; ``ValueError`` naming a bad one."""
    resources = {}
    for flag in flags:
        name, sep, amount = flag.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name or value <= 0:
            raise ValueError(f"--actor-resources {flag!r}: write NAME=AMOUNT, AMOUNT above 0")
        resources[name] = value
    return resources


def decode_memory(batch_size: int, max_size: int) -> int:
    """Bytes a decode task holds: its batch of photo bytes and of decoded RGB pixels at most
    ``max_size`` a side, plus a full-size decode of the largest photo (~24 MP)."""
    return batch_size * (max_size * max_size * 3 + 4 * 2**20) + 24_000_000 * 3


def decode_batch(
    batch: Any,
    *,
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


def _check(conf: ExtractConf) -> None:
    problems = []
    if conf.actors is not None and conf.actors < 1:
        problems.append(f"--actors must be at least 1, got {conf.actors}")
    try:
        parse_resources(conf.actor_resources)
    except ValueError as err:
        problems.append(str(err))
    for name in ("gpus_per_actor", "cpus_per_actor"):
        value = getattr(conf, name)
        if value is not None and value < 0:
            problems.append(f"--{name.replace('_', '-')} must be 0 or more, got {value}")
    problems += location_problems(images=conf.images, output=conf.output)
    raise_problems(problems)


def _photos(images: Manifest) -> _Photos:
    """The usable photos of the images output, the rows repeating a photo (same bytes), and
    how many rows failed at ingest; reading it checks that it is whole."""
    table = IMAGES.read_from(images, ["image_id", "uri", "error"])
    seen: set[str] = set()
    duplicates = set()
    failed = 0
    columns = (table.column(c).to_pylist() for c in ("image_id", "uri", "error"))
    for image_id, uri, error in zip(*columns, strict=True):
        if error is not None:
            failed += 1
            continue
        if image_id in seen:
            duplicates.add((image_id, uri))
        seen.add(image_id)
    return _Photos(frozenset(seen), frozenset(duplicates), failed)


def _described_ids(out: str, previous: Manifest | None, usable: frozenset[str]) -> set[str]:
    """The photos already described in ``out`` (by a complete output being updated, or an
    interrupted run) that stay: parts that cannot be read are removed, and rows of photos no
    longer in the images output are dropped from their parts."""
    done = DESCRIPTORS.resume_ids(out, usable)
    if previous is not None:
        logger.info("updating %s: %d photos described, kept", out, len(done))
    return done


def _network_identity(conf: ExtractConf) -> _Network:
    """What made the descriptors; loads the network once to check it and learn its size."""
    settings = conf.network
    net, whitening = load_extract_network(settings)
    if checkpoint.is_checkpoint(settings.weights):
        description = {"checkpoint": tables.resolve(settings.weights), "meta": asdict(net.meta)}
    else:
        description = {"weights": settings.weights, "meta": asdict(net.meta)}
    dim = whitening[1].shape[0] if whitening is not None else net.out_dim
    content = {
        "max_size": settings.max_size,
        "scales": list(settings.scales),
        "whitening": whitening is not None,
        "exif_transpose": True,
        "dim": int(dim),
    }
    identity = network_identity(settings)
    return _Network(identity, {**description, "identity": identity}, content)


def _details(
    out: str, network: _Network, photos: _Photos, *, reused: int, seconds: float
) -> dict[str, Any]:
    """The manifest's details: the network, its settings, the counts (``described``: by this
    run, the others kept from the output it updated) and failures."""
    table = DESCRIPTORS.read_unpublished(out, ["image_id", "error"])[0]
    errors = table["error"].to_pylist()
    return {
        "network": network.description,
        "settings": network.settings,
        "dim": network.settings["dim"],
        "count": sum(e is None for e in errors),
        "described": len(errors) - reused,
        "failed": [e for e in errors if e is not None],
        "not_ingested": photos.not_ingested,
        "seconds": round(seconds, 2),
    }


if __name__ == "__main__":
    run_cli(run, ExtractConf)
