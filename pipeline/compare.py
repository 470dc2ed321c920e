"""``make compare``: off-the-shelf retrieval on the built-in landmark collection or your own photos.

For each network (untrained ResNet-50, untrained and ImageNet EfficientNet-Lite0 by default) and
each pooling (GeM, MAC, SPoC) it prints mAP plain, with learned whitening (Lw) and with αQE.
Lw is learned from ground-truth pairs of a *separate* training collection (other landmarks,
another seed), never from the photos it is evaluated on. The whole product (SfM, training,
indexing, serving) is ``make demo`` (``pipeline.demo``).

    python -m pipeline.compare                         # built-in collection
    python -m pipeline.compare --photos ~/my_photos    # a folder per scene gives mAP
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.backbones import build_backbone
from model.cli import run_cli
from model.datasets.folders import load_folder
from model.datasets.landmarks import CONFS, generate
from model.datasets.revisited import load_revisited
from model.datasets.sets import Availability, RetrievalSet, same_label_pairs
from model.describe import describe_set
from model.extraction import DEFAULT_SCALES, ExtractOptions
from model.heads import GeMHead
from model.report import write_report
from model.results import write_json
from model.retrieval import QueryExpansion
from model.scoring import PostProcess, score, summary_map
from model.whitening import learn_whitening

logger = logging.getLogger("pipeline.compare")

POOLING_NAMES = {"gem": "GeM", "mac": "MAC", "spoc": "SPoC"}


@dataclass(frozen=True)
class CompareConf:
    """Settings of the comparison; every field is a command-line flag."""

    photos: str | None = None
    """A folder of your own photos: a sub-folder per scene gives mAP; a flat folder gives
    each photo's nearest neighbours. Default: the built-in landmark collection."""
    collection: str = "demo"
    """Preset of the built-in collection (see model.datasets.landmarks.CONFS)."""
    output: str = "outputs/compare"
    """Where the generated photos, results.json and the HTML reports go."""
    networks: tuple[str, ...] = (
        "resnet50:random",
        "efficientnet_lite0:random",
        "efficientnet_lite0:imagenet",
    )
    """backbone:weights pairs; weights are random, imagenet, a path or an s3:// URI."""
    poolings: tuple[str, ...] = ("gem", "mac", "spoc")
    max_size: int = 512
    """Longer side of the images the network sees."""
    multiscale: bool = False
    """Describe at scales 1, 1/√2, 1/2 and combine as the GeM paper does."""
    qe: QueryExpansion = field(default_factory=lambda: QueryExpansion(qe_k=2))
    """αQE rows beside the plain ones (flags --qe-k, --qe-alpha)."""
    batch_size: int | None = None
    """Default: 64 on a GPU, 1 on a CPU."""
    seed: int = 0
    """Seed of the random (untrained) networks."""


def main(conf: CompareConf) -> str:
    """Run the comparison; returns the path of ``results.json`` (reports lie beside it)."""
    out = Path(conf.output)
    out.mkdir(parents=True, exist_ok=True)
    rset, train = _photo_sets(conf, out / "data")
    logger.info(
        "%s: %d database images, %d queries (%s protocol)",
        rset.name,
        len(rset.db_paths),
        len(rset.query_paths),
        rset.protocol,
    )
    scales = DEFAULT_SCALES if conf.multiscale else (1.0,)
    options = ExtractOptions(scales=scales, batch_size=conf.batch_size)
    rows: list[dict[str, Any]] = []
    images: dict[str, Any] = {}
    for spec in conf.networks:
        network_rows, used, availability = _evaluate_network(
            spec, conf, rset, train=train, options=options, out=out
        )
        rows += network_rows
        images[spec] = availability.as_dict()
    print(f"\n{availability.summary()}")
    if rset.protocol == "none":
        _print_neighbours(used, rows)
    else:
        _print_table(used, rows, scales)
    payload = {"conf": dataclasses.asdict(conf), "set": rset.name, "images": images, "rows": rows}
    results = write_json(out / "results.json", payload)
    print(f"\nresults: {results}")
    return results


def _photo_sets(conf: CompareConf, data_root: Path) -> tuple[RetrievalSet, RetrievalSet | None]:
    """The set to evaluate and, for the built-in collection, the training set for Lw."""
    if conf.photos:
        return load_folder(conf.photos), None
    if conf.collection not in CONFS:
        raise ValueError(f"unknown collection {conf.collection!r}; choose one of {list(CONFS)}")
    test_conf = CONFS[conf.collection]
    train_conf = dataclasses.replace(
        test_conf, name=f"{test_conf.name}-train", seed=test_conf.seed + 1
    )
    rset = load_revisited(generate(test_conf, data_root))
    train = load_revisited(generate(train_conf, data_root))
    return rset, train


def _evaluate_network(
    spec: str,
    conf: CompareConf,
    rset: RetrievalSet,
    *,
    train: RetrievalSet | None,
    options: ExtractOptions,
    out: Path,
) -> tuple[list[dict[str, Any]], RetrievalSet, Availability]:
    name, _, weights = spec.partition(":")
    weights = weights or "random"
    torch.manual_seed(conf.seed)
    backbone = build_backbone(name, None if weights == "random" else weights)
    heads = {pool: GeMHead(backbone.out_channels, pooling=pool) for pool in conf.poolings}
    started = time.perf_counter()
    described = describe_set(rset, backbone, heads, max_size=conf.max_size, options=options)
    used = described.rset
    whitening_db = (
        describe_set(train, backbone, heads, max_size=conf.max_size, options=options)
        if train is not None
        else None
    )
    logger.info("%s: described in %.1f s", spec, time.perf_counter() - started)

    rows = []
    for pool in conf.poolings:
        posts = [PostProcess(), PostProcess(qe=conf.qe)]
        if whitening_db is not None:
            qidxs, pidxs = same_label_pairs(whitening_db.rset.db_labels)
            m, P = learn_whitening(whitening_db.db[pool], qidxs, pidxs)
            lw = PostProcess(whitening=(m, P))
            posts += [lw, dataclasses.replace(lw, qe=conf.qe)]
        for post in posts:
            scored = score(described.db[pool], described.queries[pool], used, post=post)
            if pool == conf.poolings[0] and post.label == "plain":
                report = out / f"report-{_file_name(spec)}.html"
                title = f"{name} ({weights}), {POOLING_NAMES.get(pool, pool)}"
                write_report(
                    report, used, scored.ranks, metrics=scored.metrics, aps=scored.aps, title=title
                )
                logger.info("report: %s", report)
            rows.append(
                {
                    "network": f"{name} ({weights})",
                    "pooling": POOLING_NAMES.get(pool, pool),
                    "post": post.label,
                    "metrics": scored.metrics,
                    "top5": scored.ranks[:, :5].tolist() if used.protocol == "none" else None,
                }
            )
    return rows, used, described.availability


def _file_name(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text)


def _print_table(rset: RetrievalSet, rows: list[dict[str, Any]], scales: tuple) -> None:
    scale_text = "multi-scale" if len(scales) > 1 else "single-scale"
    columns = list(summary_map(rows[0]["metrics"]))
    print(f"\nmAP (%) on {rset.name}, {len(rset.query_paths)} queries, {scale_text}")
    header = f"{'network':<30} {'pooling':<8} {'post-processing':<24}"
    header += "".join(f"{c:>7}" for c in columns)
    print(header)
    print("-" * len(header))
    previous = None
    for row in rows:
        network = row["network"] if row["network"] != previous else ""
        previous = row["network"]
        figures = summary_map(row["metrics"])
        line = f"{network:<30} {row['pooling']:<8} {row['post']:<24}"
        print(line + "".join(f"{100 * figures[c]:>7.1f}" for c in columns))


def _print_neighbours(rset: RetrievalSet, rows: list[dict[str, Any]]) -> None:
    """A flat folder has no ground truth: show each photo's nearest neighbours instead."""
    row = next(r for r in reversed(rows) if r["post"] == "plain")
    print(f"\nnearest neighbours with {row['network']} {row['pooling']} (no ground truth)")
    for j, top in enumerate(row["top5"]):
        names = [rset.db_paths[i].name for i in top if i != j][:4]
        print(f"{rset.query_paths[j].name:<32} -> {', '.join(names)}")


if __name__ == "__main__":
    run_cli(main, CompareConf)
