"""The whiten stage: learned whitening (Lw) from the SfM pairs, as a checkpoint to extract with.

    python -m pipeline.whiten --descriptors OUT/descriptors --pairs OUT/pairs --output OUT/lw

The GeM paper's discriminative whitening: matching pairs' differences are whitened and the
directions that separate non-matching photos most come first (``model.whitening``). From a few
hundred pairs, not the paper's thousands of 3D models, the plain Lw can overfit: its shrinkage
and output size are chosen by cross-validation over the pairs' clusters (``--shrinkage`` and
``--dim`` fix them; ``--shrinkage 0`` with the full dim is the paper's Lw). The pairs
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
from typing import TYPE_CHECKING

import numpy as np

from model import storage
from model.whitening import SHRINKAGES
from pipeline.cli import location_problems, run_cli

if TYPE_CHECKING:
    from pipeline.tuples import TrainingSet

__all__ = [
    "LW_META",
    "WHITENING_FILE",
    "WhitenConf",
    "held_out_whitening",
    "pool_clusters",
    "run",
    "whitening_from_pairs",
    "whitening_on_held_out",
]

logger = logging.getLogger(__name__)

WHITENING_FILE = "whitening.npz"

LW_META = ("pairs", "shrinkage", "dim", "cross_validation")
"""What ``whitening.npz`` records of how its Lw was learned (``whitening_from_pairs``' how)."""


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
    shrinkage: float | None = None
    """Lw's shrinkage of the pairs' covariance toward the identity, in [0, 1] (0: the paper's
    Lw); unset: chosen by cross-validation over the pairs' clusters."""
    dim: int | None = None
    """Output size (Lw's leading rows); unset: chosen by the same cross-validation."""


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
    image_ids: np.ndarray,
    vectors: np.ndarray,
    pairs: list[tuple[str, str]],
    min_pairs: int = 10,
    clusters: np.ndarray | None = None,
    shrinkage: float | None = None,
    dim: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(m, P, how)``: Lw learned over ``vectors`` from the pairs whose two photos both have a
    row (``image_ids`` names the rows), ``P`` cut to its output size.

    ``shrinkage`` and ``dim`` left ``None`` are chosen by cross-validation over the rows'
    ``clusters`` (``model.whitening.select_whitening``; no clusters: the paper's Lw). ``how``
    says what was used: pairs, shrinkage, dim and the cross-validation's figures.
    """
    from model.whitening import learn_whitening, select_whitening

    row = {image_id: i for i, image_id in enumerate(np.asarray(image_ids).tolist())}
    usable = [(row[q], row[p]) for q, p in pairs if q in row and p in row]
    if len(usable) < min_pairs:
        raise ValueError(
            f"{len(usable)} of {len(pairs)} whitening pairs have both photos described "
            f"(at least {min_pairs} needed)"
        )
    q, p = np.array(usable, dtype=np.int64).T
    how: dict = {"pairs": len(usable)}
    if (shrinkage is None or dim is None) and clusters is not None:
        choice = select_whitening(vectors, clusters, q, p,
                                  shrinkages=(shrinkage,) if shrinkage is not None else SHRINKAGES,
                                  dims=(dim,) if dim is not None else None)  # fmt: skip
        shrinkage, dim = choice.shrinkage, choice.dim
        how["cross_validation"] = {"folds": choice.folds, "map": choice.score,
                                   "map_plain": choice.plain,
                                   "candidates": choice.table}  # fmt: skip
    shrinkage = 0.0 if shrinkage is None else shrinkage
    m, P = learn_whitening(vectors, q, p, shrinkage=shrinkage)
    dim = P.shape[0] if dim is None else dim
    if not 1 <= dim <= P.shape[0]:
        raise ValueError(f"the whitening dim must lie in [1, {P.shape[0]}], not {dim}")
    return m, P[:dim], {**how, "shrinkage": shrinkage, "dim": dim}


def held_out_whitening(
    image_ids: np.ndarray,
    vectors: np.ndarray,
    pool: TrainingSet,
    pairs: list[tuple[str, str]],
    held_out: float,
    seed: int = 0,
    shrinkage: float | None = None,
    dim: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(m, P, how)``: :func:`whitening_on_held_out` over the pool's photos, split by
    ``split_clusters(pool, held_out, seed)``.

    ``vectors`` are rows named by ``image_ids`` (the collection's descriptors); the figures are
    left out when some pool photo has no row, rather than skewed."""
    from pipeline.tuples import split_clusters

    train, val = split_clusters(pool, held_out, seed)
    row = {image_id: i for i, image_id in enumerate(np.asarray(image_ids).tolist())}
    present = np.array([i in row for i in pool.image_ids.tolist()], dtype=bool)
    ids = pool.image_ids[present]
    x = vectors[[row[i] for i in ids.tolist()]]
    queries = None
    if present.all():
        pool_row = {image_id: i for i, image_id in enumerate(ids.tolist())}
        queries = np.array([pool_row[i] for i in val.image_ids[val.queries].tolist()], np.int64)
    models = None if pool.models is None else pool.models[present]
    return whitening_on_held_out(ids, x, pool.clusters[present], np.isin(ids, train.image_ids),
                                 queries, pairs, shrinkage, dim, models)  # fmt: skip


def whitening_on_held_out(
    image_ids: np.ndarray,
    vectors: np.ndarray,
    clusters: np.ndarray,
    trained: np.ndarray,
    queries: np.ndarray | None,
    pairs: list[tuple[str, str]],
    shrinkage: float | None = None,
    dim: int | None = None,
    models: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(m, P, how)``: Lw from the rows of the mask ``trained`` only (the pairs among them,
    their scatter; shrinkage and dim by cross-validation over their ``clusters`` unless
    given), and in ``how`` the held-out ``queries``' (row indices) mAP against every row,
    their cluster's rows positive (their 3D model's, the rest of the cluster junk, given
    ``models``), without (``val_map``) and with it (``val_map_lw``). ``queries`` None: Lw
    alone."""
    from model.evaluation import cluster_map
    from model.whitening import apply_whitening

    ids = np.asarray(image_ids)
    trained = np.asarray(trained, dtype=bool)
    inside = set(ids[trained].tolist())
    m, P, how = whitening_from_pairs(ids[trained], vectors[trained],
                                     [(q, p) for q, p in pairs if q in inside and p in inside],
                                     clusters=np.asarray(clusters)[trained],
                                     shrinkage=shrinkage, dim=dim)  # fmt: skip
    if queries is not None:
        how["val_map"] = cluster_map(vectors, clusters, queries, models)
        how["val_map_lw"] = cluster_map(apply_whitening(vectors, m, P), clusters, queries, models)
    return m, P, how


def pool_clusters(pairs: str, image_ids: np.ndarray) -> np.ndarray:
    """The SfM cluster of each of ``image_ids`` from a pairs output's pool; photos outside
    the pool get a cluster of their own (never anyone's positive)."""
    from pipeline.tuples import read_training_set

    pool = read_training_set(pairs)
    cluster_of = dict(zip(pool.image_ids.tolist(), pool.clusters.tolist(), strict=True))
    ids = np.asarray(image_ids).tolist()
    return np.array([cluster_of.get(i, -1 - k) for k, i in enumerate(ids)], np.int64)


def _check(conf: WhitenConf) -> None:
    problems = []
    if conf.min_pairs < 1:
        problems.append(f"--min-pairs must be at least 1, not {conf.min_pairs}")
    if conf.shrinkage is not None and not 0 <= conf.shrinkage <= 1:
        problems.append(f"--shrinkage is a share in [0, 1], not {conf.shrinkage}")
    if conf.dim is not None and conf.dim < 1:
        problems.append(f"--dim must be at least 1, not {conf.dim}")
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
    clusters = pool_clusters(conf.pairs, desc.image_ids)
    m, P, how = whitening_from_pairs(desc.image_ids, desc.vectors, pairs, conf.min_pairs,
                                     clusters, conf.shrinkage, conf.dim)  # fmt: skip
    save_network(net, out)  # model.pt, then meta.json; whitening.npz after: it marks the end
    save_whitening(
        lw_uri,
        m,
        P,
        **how,
        descriptors=conf.descriptors,
        pairs_uri=conf.pairs,
        network={k: v for k, v in network.items() if k != "meta"},
    )
    logger.info(
        "whitening learned from %d pairs over %d photos (shrinkage %g, dim %d) → %s",
        how["pairs"],
        len(desc.image_ids),
        how["shrinkage"],
        how["dim"],
        out,
    )
    return out


if __name__ == "__main__":
    run_cli(run, WhitenConf)
