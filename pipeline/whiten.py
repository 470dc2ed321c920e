"""The whiten stage: learned whitening (Lw) from the SfM pairs, as a checkpoint to extract with.

    python -m pipeline.whiten --descriptors OUT/descriptors --pairs OUT/pairs --output OUT/lw

The GeM paper's discriminative whitening: matching pairs' differences are whitened and the
directions that separate non-matching photos most come first (``model.whitening``). From a few
hundred pairs, not the paper's thousands of 3D models, the plain Lw can overfit: its shrinkage
and output size are chosen by cross-validation over the pairs' clusters (``--whiten-shrinkage``
and ``--whiten-dim`` fix them; ``--whiten-shrinkage 0`` with the full dim is the paper's Lw; the
same flags as the train stage's Lw, ``model.whitening_fit.LwFit``). The pairs are the
whitening pairs that ``pipeline.pairs`` mined from the 3D models (each query with its most
overlapping positive: no human label), the descriptors those that ``pipeline.extract`` wrote for
the collection with the network to whiten (the off-the-shelf one, or a training checkpoint).

Output: a checkpoint (``model.checkpoint``: that network with the learned whitening) that
``pipeline.extract --weights`` and ``pipeline.evaluate --weights`` take as it is, then the
manifest (``tables.WHITEN_OUTPUT``) last. A rerun with the same descriptors, pairs and settings
skips; other descriptors or pairs learn it again; other settings stop with a line naming them,
unless ``--overwrite``. The fitting itself is ``model.whitening_fit``
(:func:`~model.whitening_fit.whitening_from_pairs`), which the training stage uses the same way
on its own network's descriptors.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from model import checkpoint, tables
from model.cli import FlatFlags, location_problems, log_settings, run_cli
from model.describer import NetworkSettings, load_extract_network
from model.descriptors import Descriptors, read_descriptors
from model.settings import raise_problems
from model.whitening_fit import LwFit, pool_clusters, read_whitening_pairs, whitening_from_pairs

__all__ = ["WhitenConf", "content_settings", "run"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WhitenConf(FlatFlags):
    """Settings of one whitening; every field is a command-line flag."""

    descriptors: str
    """Descriptors of the collection (pipeline.extract), made by the network to whiten."""
    pairs: str
    """The output of pipeline.pairs (its whitening pairs)."""
    output: str
    """Checkpoint folder to write."""
    fit: LwFit = field(default_factory=LwFit)
    """Lw's shrinkage, size and fewest pairs (flags --whiten-shrinkage, --whiten-dim,
    --min-pairs; fewer usable pairs is an error)."""
    overwrite: bool = False
    """Replace an output made with other settings (else the run stops, naming them)."""


def _check(conf: WhitenConf) -> None:
    problems = location_problems(descriptors=conf.descriptors, pairs=conf.pairs, output=conf.output)
    raise_problems(problems)


def content_settings(conf: WhitenConf) -> dict[str, Any]:
    """The settings that change the whitening (not where things lie, nor --overwrite)."""
    return asdict(conf.fit)


def _read_inputs(conf: WhitenConf) -> tuple[Descriptors, list[tuple[str, str]]]:
    problems = []
    try:
        descriptors = read_descriptors(conf.descriptors)
    except (OSError, ValueError) as err:
        problems.append(f"--descriptors: {err}")
    try:
        pairs = read_whitening_pairs(conf.pairs)
    except (OSError, ValueError) as err:
        problems.append(f"--pairs: {err}")
    raise_problems(problems)
    return descriptors, pairs


def _plain_network(conf: WhitenConf, descriptors: Descriptors) -> Any:
    """The network that made the descriptors; refused when it whitens already (Lw on Lw)."""
    network = descriptors.manifest["network"]
    settings = NetworkSettings.from_manifest(network, descriptors.manifest.get("settings") or {})
    net, applied = load_extract_network(settings)
    if applied is not None:
        raise ValueError(
            f"--descriptors: {conf.descriptors} are already whitened (the checkpoint "
            f"{network.get('checkpoint')} has a whitening); extract with the plain network"
        )
    return net


def run(conf: WhitenConf) -> str:
    """Learn Lw and write the whitened checkpoint; returns its folder."""
    _check(conf)
    log_settings(logger, "whiten", conf)
    out = tables.resolve(conf.output)
    inputs = tables.upstream(
        descriptors=(tables.DESCRIPTORS_OUTPUT, conf.descriptors),
        pairs=(tables.PAIRS_OUTPUT, conf.pairs),
    )
    settings = content_settings(conf)
    plan, _ = tables.WHITEN_OUTPUT.plan(out, inputs, settings, overwrite=conf.overwrite)
    if plan == "skip":
        logger.info("%s is complete; skipping", out)
        return out
    descriptors, pairs = _read_inputs(conf)
    net = _plain_network(conf, descriptors)
    clusters = pool_clusters(conf.pairs, descriptors.image_ids)
    m, P, how = whitening_from_pairs(
        descriptors.image_ids,
        descriptors.vectors,
        pairs,
        fit=conf.fit,
        clusters=clusters,
    )
    tables.WHITEN_OUTPUT.unpublish(out)
    identity = checkpoint.save(out, net, (m, P), whitening_meta=how)
    details = {"checkpoint": identity, "photos": len(descriptors.image_ids), **how}
    tables.WHITEN_OUTPUT.publish(out, inputs=inputs, settings=settings, details=details)
    logger.info(
        "whitening learned from %d pairs over %d photos (shrinkage %g, dim %d) → %s",
        how["pairs"],
        len(descriptors.image_ids),
        how["shrinkage"],
        how["dim"],
        out,
    )
    return out


if __name__ == "__main__":
    run_cli(run, WhitenConf)
