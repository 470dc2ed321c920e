"""cnnimageretrieval-pytorch's published training pairs (``retrieval-SfM-120k.pkl``), trained on.

    python -m pipeline.train --pairs DATA/train/retrieval-SfM-120k/retrieval-SfM-120k.pkl \\
        --images DATA/train/retrieval-SfM-120k/ims --output OUT/train

The file's format, its checks and its conversion are ``model.cirtorch_pairs``'s. What maps to
what:

- ``train`` is what the network trains on: each ``(qidxs[i], pidxs[i])`` is one query of the
  pairs table with that one positive, and an epoch draws ``--queries`` of them, as cirtorch
  draws its ``qsize``; every photo of the split is in the pool that hard negatives are mined
  from, and negatives come from other clusters only (the mining actor's rule, cirtorch's
  ``clusters[n] != clusters[q]``), one per cluster.
- ``val`` is the held-out validation, exactly: its clusters are the ones ``split_clusters``
  holds out (numbered so that its seeded draw takes them first; ``--held-out`` is replaced by
  their share of the queries, and the split is checked after the tables are written). They
  are never trained on nor mined as negatives; validation scores their queries' mAP against
  them and the training photos, where cirtorch reports a loss on tuples mined among them.
- Learned whitening: every pair is also a whitening pair; the trainer fits Lw on the training
  split's ones (cirtorch fits it on a file of its own, ``retrieval-SfM-30k-whiten.pkl``).
- A file without ``val`` (``pipeline.pairs --export-pkl`` writes ``train`` only) validates
  as a pairs output does: ``--held-out`` of its clusters are held out.

What the trainer consumes is written once under ``OUTPUT/published/``: an images output of the
file's photos (their bytes copied once, by Ray tasks that never import torch, a part per block
of photos, each photo decoded once to check it; content-hash image ids as everywhere, so
byte-identical photos are one image: in one cluster they merge, in two they are left out) and
a pairs output. Both resume: photos copied already are not read again (also for another file
of the same photos), and a rerun with the same file finds both complete without listing the
photos. The file's identity, the hash of its bytes, is the train output's ``pairs`` input.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from tqdm import tqdm

from model import storage, tables
from model.cirtorch_pairs import (
    Converted,
    PublishedPairs,
    capped,
    cid2filename,
    convert,
    is_published,
    missing_photos,
    read_published,
    write_photos,
)
from model.settings import raise_problems
from model.training_set import read_training_set, split_clusters

__all__ = ["CACHE", "Published", "is_published", "prepare"]

logger = logging.getLogger(__name__)

CACHE = "published"
"""The folder under OUTPUT that holds the images and pairs outputs made from the file."""
_BLOCK = 64
"""Photos per Ray task and per part file (as ingest's batch)."""
_SHOWN = 10
_TASK_MEMORY = 512 * 2**20
_IMAGES_SETTINGS = {"layout": "cirtorch cid2filename", "exif_transpose": True}


@dataclass(frozen=True)
class Published:
    """What the trainer runs on instead of ``--pairs`` and ``--images``."""

    pairs: str
    """The pairs output made from the file."""
    images: str
    """The images output of its photos."""
    held_out: float
    """``--held-out`` as the run takes it: the ``val`` clusters' share, or as given."""
    identity: str
    """The file's identity: the train output's ``pairs`` input."""
    details: dict[str, Any]


def prepare(pkl: str, ims: str, *, output: str, seed: int, held_out: float) -> Published:
    """The file ``pkl`` and the photos under ``ims`` as a pairs output and an images output
    under ``OUTPUT/published`` (made, completed, or found complete)."""
    published = read_published(pkl)
    cache = storage.join(output, CACHE)
    images = tables.IMAGES_OUTPUT.locate(cache)
    manifest = _copy_photos(published, ims, images)
    rows = tables.IMAGES.read_from(manifest, ["uri", "image_id", "error"])
    by_uri = {
        uri: image if error is None else None
        for uri, image, error in zip(
            rows["uri"].to_pylist(),
            rows["image_id"].to_pylist(),
            rows["error"].to_pylist(),
            strict=True,
        )
    }
    photo_ids = {c: by_uri.get(cid2filename(c, ims)) for c in published.cids}
    pairs = storage.join(cache, "pairs")
    inputs: dict[str, tables.Manifest | str] = {"pkl": published.identity, "images": manifest}
    # the clusters are numbered for the seed's draw of the held-out ones (a 'val' split only)
    settings = {"seed": seed if "val" in published.splits else None}
    action, made = tables.PAIRS_OUTPUT.plan(pairs, inputs, settings, overwrite=True)
    if action != "skip" or made is None:
        converted = convert(published, photo_ids, seed=seed)
        tables.PAIRS_OUTPUT.unpublish(pairs)
        tables.PAIRS.write(pairs, converted.pairs)
        tables.WHITENING_PAIRS.write(pairs, converted.whitening)
        tables.POOL.write(pairs, converted.pool)
        made = tables.PAIRS_OUTPUT.publish(
            pairs, inputs=inputs, settings=settings, details=converted.details
        )
        _check_held_out(pairs, converted, seed=seed)
    details = made.details
    left_out = details["photos_in_two_clusters"] + details["photos_left_out"]
    if details["dropped_pairs"] or left_out:
        logger.warning(
            "%s: pairs left out: %s; photos in two clusters (left out): %d; photos of 'val' "
            "clusters without a usable pair (left out): %d",
            pkl,
            details["dropped_pairs"],
            details["photos_in_two_clusters"],
            details["photos_left_out"],
        )
    taken = details["held_out"] if isinstance(details["held_out"], float) else held_out
    logger.info(
        "%s (%s): pairs %s, clusters %s, %d photos; held out: %s",
        pkl,
        published.identity,
        details["pairs"],
        details["clusters"],
        details["photos"],
        "the 'val' split" if "val" in published.splits else f"{held_out} of 'train'",
    )
    return Published(
        pairs=pairs,
        images=images,
        held_out=taken,
        identity=published.identity,
        details={**details, "pairs_output": pairs, "images_output": images},
    )


def _check_held_out(pairs: str, converted: Converted, *, seed: int) -> None:
    """The held-out set the trainer will draw is the ``val`` split's photos, exactly (else the
    pairs output is unpublished: no rerun takes it)."""
    if converted.held_out is None:
        return
    _, val = split_clusters(read_training_set(pairs), converted.held_out, seed)
    if set(val.image_ids.tolist()) != converted.val_ids:
        tables.PAIRS_OUTPUT.unpublish(pairs)
        raise RuntimeError(
            f"{pairs}: the held-out clusters are not the 'val' split's "
            f"({len(val.image_ids)} photos, expected {len(converted.val_ids)}); "
            "model.training_set.split_clusters changed: update pipeline.train.published"
        )


def _copy_photos(published: PublishedPairs, ims: str, images: str) -> tables.Manifest:
    """The images output at ``images`` holding the file's photos: complete already, or the
    photos it lacks checked for, read and written (Ray tasks), then published."""
    uris = sorted(cid2filename(c, ims) for c in published.cids)
    source = hashlib.sha256("\n".join(uris).encode()).hexdigest()[:20]
    inputs = {"source": source}
    action, manifest = tables.IMAGES_OUTPUT.plan(images, inputs, _IMAGES_SETTINGS, overwrite=True)
    if action == "skip" and manifest is not None:
        logger.info("%s holds the photos of %s already", images, published.uri)
        return manifest
    raise_problems(missing_photos(published, ims))
    existing, unreadable = tables.IMAGES.read_unpublished(images, ["uri"])
    raise_problems(unreadable)
    done = set(existing["uri"].to_pylist())
    todo = [u for u in uris if u not in done]
    logger.info(
        "%d photos of %s: %d copied already, %d to copy into %s",
        len(uris),
        published.uri,
        len(uris) - len(todo),
        len(todo),
        images,
    )
    tables.IMAGES_OUTPUT.unpublish(images)
    failures = _copy(todo, images)
    if failures:
        lines = [f"--images: cannot read {uri}: {reason}" for uri, reason in failures]
        raise OSError(
            "\n".join(capped(lines, "unreadable photos"))
            + "\nrun again to read them (the photos read are kept)"
        )
    rows = _rows(images, uris)
    failed = rows.filter(pc.is_valid(rows["error"]))
    shown = failed.slice(0, _SHOWN)
    for uri, error in zip(shown["uri"].to_pylist(), shown["error"].to_pylist(), strict=True):
        logger.warning("unusable photo %s: %s", uri, error)
    details = {
        "source": ims,
        "pkl": published.uri,
        "uris": len(uris),
        "ingested": rows.num_rows - failed.num_rows,
        "failed": failed.num_rows,
    }
    return tables.IMAGES_OUTPUT.publish(
        images, inputs=inputs, settings=_IMAGES_SETTINGS, details=details
    )


def _rows(images: str, uris: Sequence[str]) -> pa.Table:
    """``uri``, ``image_id``, ``error`` of the rows of ``uris`` in the (maybe unfinished)
    images output."""
    table, problems = tables.IMAGES.read_unpublished(images, ["uri", "image_id", "error"])
    raise_problems(problems)
    return table.filter(pc.is_in(table["uri"], pa.array(list(uris), pa.string())))


def _copy(todo: list[str], images: str) -> list[tuple[str, str]]:
    """The photos of ``todo`` read, checked and written into ``images`` by Ray tasks, a part
    per block; returns ``(uri, reason)`` of those that could not be read (not written)."""
    if not todo:
        return []
    if not ray.is_initialized():
        ray.init()
    task = ray.remote(write_photos).options(
        num_cpus=1, memory=_TASK_MEMORY, max_retries=3, retry_exceptions=True
    )
    blocks = [todo[i : i + _BLOCK] for i in range(0, len(todo), _BLOCK)]
    pending = {task.remote(block, images): len(block) for block in blocks}
    failures: list[tuple[str, str]] = []
    with tqdm(total=len(todo), desc="copy photos", unit="photo") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            failures += ray.get(done[0])
            bar.update(pending.pop(done[0]))
    return failures
