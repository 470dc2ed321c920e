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
``pipeline.evaluate --weights`` take as it is. The fitting itself is ``model.whitening_fit``
(:func:`~model.whitening_fit.whitening_from_pairs`), which the training stage uses the same way
on its own network's descriptors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from model import storage
from model.cli import location_problems, run_cli
from model.whitening_fit import (
    WHITENING_FILE,
    pool_clusters,
    read_whitening_pairs,
    whitening_from_pairs,
)

__all__ = ["WhitenConf", "run"]

logger = logging.getLogger(__name__)


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
    from model.describer import conf_for_network, load_extract_network
    from model.descriptors import read_descriptors
    from model.networks import save_network
    from model.whitening import save_whitening

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
