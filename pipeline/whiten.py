"""The whiten stage: learned whitening (Lw) from the SfM pairs, as a checkpoint to extract with.

    python -m pipeline.whiten --descriptors OUT/descriptors --pairs OUT/pairs --output OUT/lw

The GeM paper's discriminative whitening: matching pairs' differences are whitened and the
directions that separate non-matching photos most come first (``model.whitening``). The pairs
are the ``whitening_pairs.parquet`` that ``pipeline.pairs`` mined from the 3D models (each
query with its most overlapping positive: no human label), the descriptors those that
``pipeline.extract`` wrote for the collection with the network to whiten (the off-the-shelf one,
or a training checkpoint). Output: a checkpoint directory (``model.pt`` and ``meta.json`` of
that network, ``whitening.npz`` beside them) that ``pipeline.extract --weights`` and
``pipeline.evaluate --weights`` take as it is. The training stage learns its Lw the same way
(:func:`whitening_from_pairs`) from its own network's descriptors.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np

from model import storage
from pipeline.cli import location_problems, run_cli

__all__ = ["WHITENING_FILE", "WhitenConf", "run", "whitening_from_pairs"]

logger = logging.getLogger(__name__)

WHITENING_FILE = "whitening.npz"


@dataclass(frozen=True)
class WhitenConf:
    """Settings of one whitening; every field is a command-line flag."""

    descriptors: str
    """Descriptors of the collection (pipeline.extract), made by the network to whiten."""
    pairs: str
    """The folder written by pipeline.pairs (its whitening_pairs.parquet)."""
    output: str
    """Checkpoint directory to write (model.pt, meta.json, whitening.npz)."""
    min_pairs: int = 10
    """Fewer usable pairs than this is an error: Lw from a handful of pairs only overfits."""


def read_whitening_pairs(pairs: str) -> list[tuple[str, str]]:
    """``(query_id, positive_id)`` of a complete pairs output."""
    import pyarrow.parquet as pq

    from pipeline.pairs import WHITENING_PAIRS_FILE

    folder = pairs.rstrip("/")
    if not storage.is_complete(folder):
        raise ValueError(f"{folder} is not a complete pairs output (no {storage.SUCCESS})")
    data = storage.read_bytes(storage.join(folder, WHITENING_PAIRS_FILE))
    table = pq.read_table(io.BytesIO(data))
    return list(zip(table["query_id"].to_pylist(), table["positive_id"].to_pylist(), strict=True))


def whitening_from_pairs(
    image_ids: np.ndarray, vectors: np.ndarray, pairs: list[tuple[str, str]], min_pairs: int = 10
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(m, P, pairs used)``: Lw learned over ``vectors`` from the pairs whose two photos both
    have a row (``image_ids`` names the rows)."""
    from model.whitening import learn_whitening

    row = {image_id: i for i, image_id in enumerate(np.asarray(image_ids).tolist())}
    usable = [(row[q], row[p]) for q, p in pairs if q in row and p in row]
    if len(usable) < min_pairs:
        raise ValueError(
            f"{len(usable)} of {len(pairs)} whitening pairs have both photos described "
            f"(at least {min_pairs} needed)"
        )
    q, p = np.array(usable, dtype=np.int64).T
    m, P = learn_whitening(vectors, q, p)
    return m, P, len(usable)


def _check(conf: WhitenConf) -> None:
    problems = []
    if conf.min_pairs < 1:
        problems.append(f"--min-pairs must be at least 1, not {conf.min_pairs}")
    problems += location_problems(
        descriptors=conf.descriptors, pairs=conf.pairs, output=conf.output
    )
    if problems:
        raise ValueError("\n".join(problems))


def run(conf: WhitenConf) -> str:
    """Learn Lw and write the whitened checkpoint; returns its directory."""
    from model.networks import save_network
    from model.whitening import save_whitening
    from pipeline.descriptors import read_descriptors
    from pipeline.extract import conf_for_network, load_extract_network

    _check(conf)
    out = conf.output.rstrip("/")
    lw_uri = storage.join(out, WHITENING_FILE)
    if storage.is_file(lw_uri) and storage.is_file(storage.join(out, "meta.json")):
        logger.info("%s already holds a whitened checkpoint; skipping", out)
        return out
    problems = []
    try:
        desc = read_descriptors(conf.descriptors)
    except (OSError, ValueError) as err:
        problems.append(f"--descriptors: {err}")
    try:
        pairs = read_whitening_pairs(conf.pairs)
    except (OSError, ValueError) as err:
        problems.append(f"--pairs: {err}")
    if problems:
        raise ValueError("\n".join(problems))
    network = desc.manifest["network"]
    extract_conf = conf_for_network(network, desc.manifest.get("settings") or {})
    net, applied = load_extract_network(extract_conf)
    if applied is not None:
        raise ValueError(
            f"--descriptors: {conf.descriptors} are already whitened (the checkpoint "
            f"{network.get('checkpoint')} has a {WHITENING_FILE}); extract with the plain network"
        )
    m, P, used = whitening_from_pairs(desc.image_ids, desc.vectors, pairs, conf.min_pairs)
    save_network(net, out)  # model.pt, then meta.json; whitening.npz after: it marks the end
    save_whitening(
        lw_uri,
        m,
        P,
        pairs=used,
        descriptors=conf.descriptors,
        pairs_uri=conf.pairs,
        network={k: v for k, v in network.items() if k != "meta"},
    )
    logger.info(
        "whitening learned from %d pairs over %d photos (dim %d) → %s",
        used,
        len(desc.image_ids),
        P.shape[0],
        out,
    )
    return out


if __name__ == "__main__":
    run_cli(run, WhitenConf)
