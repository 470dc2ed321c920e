"""The evaluate stage: Revisited Oxford/Paris (and any set in their layout) from a folder or S3.

    python -m pipeline.evaluate --dataset roxford5k --data-root /data/revisitop \
        --backbone efficientnet_lite0 --weights imagenet --scales 1 0.7071 0.5 --qe-k 2

The layout is cnnimageretrieval-pytorch's: ``<root>/<dataset>/jpg/<name>.jpg`` and
``<root>/<dataset>/gnd_<dataset>.pkl``, with revisited (easy/hard/junk) or original (ok/junk)
ground truth. Queries are their photos cropped to ``bbx``; database images are resized to
``max_size`` (never enlarged) and a query crop by its whole photo's factor; photos are read in
their stored pixel frame, as the protocol defines its boxes. A folder of scene folders
(``<root>/<dataset>/<scene>/<photo>``) is evaluated too: every photo is a query, the other
photos of its scene its positives. A partial or damaged copy is
evaluated on what is there: every missing or unusable photo is counted and named, in the
output and in ``metrics.json``. Descriptors are cached per photo (``model.descriptor_cache``)
so trying αQE or whitening variants never extracts again; metrics are exact at any database
size without a full ranking (``model.scoring``). ``--rerank K`` re-ranks each query's top K by
spatial verification of local features (``model.reranking``); ``--kreciprocal`` re-ranks the
whole database by k-reciprocal encoding (``model.kreciprocal``), before the verification where
both are asked for. The figures with and without them are printed and kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import checkpoint, storage
from model.cli import FlatFlags, log_settings, run_cli
from model.datasets.folders import load_folder
from model.datasets.revisited import load_revisited
from model.datasets.sets import IMAGE_SUFFIXES, RetrievalSet, list_images
from model.describe import DescribedSet, describe_set
from model.describer import NetworkSettings
from model.descriptor_cache import DescriptorCache, digest
from model.extraction import ExtractOptions
from model.kreciprocal import KReciprocalSettings, kreciprocal_distances, shortlist_order
from model.local_feature_cache import LocalFeatureCache
from model.local_features import LocalFeatureOptions
from model.networks import NetworkMeta, RetrievalNet, build_network
from model.report import write_report
from model.rerank_set import RerankedSet, rerank_set
from model.reranking import QueryRerank, RerankSettings
from model.results import write_json
from model.retrieval import QueryExpansion, rank_by_similarity
from model.scoring import PostProcess, format_metrics, post_process, score, score_reranked
from model.whitening import load_whitening

__all__ = ["EvaluateConf", "run"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConf(FlatFlags):
    """Settings of one evaluation; every field is a command-line flag."""

    dataset: str
    """roxford5k, rparis6k, or any data set in their layout."""
    data_root: str
    """Folder or s3:// prefix holding <dataset>/jpg and <dataset>/gnd_<dataset>.pkl."""
    network: NetworkSettings = field(default_factory=NetworkSettings)
    """The network and how it sees a photo (flags --weights, --backbone, --pooling, --p,
    --max-size, --scales): --weights is imagenet, random, a weights file (path or s3://), or a
    training checkpoint, which brings its own backbone and head."""
    whitening: str | None = None
    """Learned whitening (.npz from model.whitening.save_whitening), path or s3://; without
    it, a checkpoint's own whitening.npz (pipeline.whiten, pipeline.train) is applied."""
    checkpoint_whitening: bool = True
    """--no-checkpoint-whitening: leave a checkpoint's whitening.npz unapplied."""
    whitening_dim: int | None = None
    qe: QueryExpansion = field(default_factory=QueryExpansion)
    """αQE (flags --qe-k, --qe-alpha); off by default."""
    kreciprocal: KReciprocalSettings = field(default_factory=KReciprocalSettings)
    """k-reciprocal re-ranking of the whole database or of each query's top K (flags
    --kreciprocal, --kreciprocal-*); off by default. With --rerank, the verification re-ranks
    its top K."""
    reranking: RerankSettings = field(default_factory=RerankSettings)
    """Spatial re-ranking of the top --rerank by local features (flags --rerank, --rerank-*);
    off by default. The figures without it are printed and kept beside those with it."""
    local: LocalFeatureOptions = field(default_factory=LocalFeatureOptions)
    """The local features re-ranking matches (flags --local-*)."""
    distractors: str | None = None
    """Folder or s3:// prefix of distractor photos (R1M style) added to the database."""
    kappas: tuple[int, ...] = (1, 5, 10)
    output: str = "outputs/evaluate"
    """Folder or s3:// prefix for metrics.json and report.html."""
    cache_dir: str = "outputs/cache"
    batch_size: int | None = None
    """Default: 64 on a GPU, 1 on a CPU."""
    num_workers: int = 2
    device: str | None = None
    seed: int = 0
    """Seed of a random network."""


def run(conf: EvaluateConf) -> dict[str, Any]:
    """Evaluate; prints the figures as papers do, writes ``metrics.json`` and ``report.html``."""
    started = time.perf_counter()
    _check(conf)
    log_settings(logger, "evaluate", conf.settings())
    weights = conf.network.weights
    loaded = checkpoint.load(weights) if checkpoint.is_checkpoint(weights) else None
    post = _post_process(conf, loaded)  # weights and whitening first: quick, a common mistake
    net, network_key = _network(conf, loaded)
    described, identity = _describe(conf, net, network_key)
    used, availability = described.rset, described.availability
    # whitened and expanded once: the global ranking and every re-ranking start from these
    ready = post_process(
        described.db["descriptor"], described.queries["descriptor"], used, post=post
    )
    scored = score(*ready, used, kappas=conf.kappas)
    print(format_metrics(conf.dataset, scored.metrics, conf.kappas))
    reranking: dict[str, Any] = {}
    done = before = None
    if conf.kreciprocal.kreciprocal or conf.reranking.rerank:
        reranking["metrics_without_rerank"] = scored.metrics
    if conf.kreciprocal.kreciprocal:
        started_kr = time.perf_counter()
        before = _kreciprocal(conf.kreciprocal, ready, used)
        seconds = time.perf_counter() - started_kr
        scored = score_reranked(*ready, used, reranked=before, kappas=conf.kappas)
        reranking["kreciprocal_seconds_per_query"] = seconds / len(before)
        reranking["metrics_with_kreciprocal"] = scored.metrics
        print(f"with {conf.kreciprocal.label}:")
        print(format_metrics(conf.dataset, scored.metrics, conf.kappas))
        if conf.kreciprocal.kreciprocal_top:
            graph = f"each over its top {conf.kreciprocal.kreciprocal_top}"
        else:
            photos = len(used.db_paths) + (0 if used.queries_are_database else len(before))
            graph = f"the neighbour graph of {photos} photos included"
        print(f"k-reciprocal: {1000 * seconds / len(before):.1f} ms a query, {graph}")
    if conf.reranking.rerank:
        done, cost = _rerank(conf, described, ready, before=before)
        scored = done.scored
        reranking.update(cost)
        print(f"with {' + '.join(_labels(conf, post)[1:])}:")
        print(format_metrics(conf.dataset, scored.metrics, conf.kappas))
        print(
            f"re-ranking: {cost['seconds_per_query']:.2f} s a query "
            f"({cost['pairs_per_query']:.0f} pairs verified, {cost['ms_per_pair']:.1f} ms a "
            f"pair); local features of {cost['photos_extracted']} photos extracted in "
            f"{cost['extract_seconds']:.1f} s"
        )

    post_label = " + ".join(x for x in _labels(conf, post) if x != "plain") or post.label
    result = {
        "dataset": conf.dataset,
        "protocol": used.protocol,
        "metrics": scored.metrics,
        "settings": conf.settings(),
        "network": network_key,
        "extraction": identity,
        "post_processing": post_label,
        **reranking,
        "images": availability.as_dict(),
        "queries_without_positives": _queries_without_positives(used),
        "extracted": described.extracted,
        "seconds": round(time.perf_counter() - started, 2),
    }
    out = storage.join(conf.output, conf.dataset, digest(result["settings"]))
    write_json(storage.join(out, "metrics.json"), result)
    write_report(
        storage.join(out, "report.html"),
        used,
        scored.ranks,
        metrics=scored.metrics,
        db_paths=described.db_paths,
        aps=scored.aps,
        verified=None if done is None else [_verified(r) for r in done.queries],
        match_figures=None if done is None else done.figures,
        baseline=None
        if not reranking
        else (
            "without " + " + ".join(_labels(conf, post)[1:]),
            reranking["metrics_without_rerank"],
        ),
        title=f"{conf.dataset}: {network_key.get('backbone', weights)}, {post_label}",
    )
    print(availability.summary())
    print(
        f"metrics: {storage.join(out, 'metrics.json')}\nreport:  {storage.join(out, 'report.html')}"
    )
    return result


def _labels(conf: EvaluateConf, post: PostProcess) -> list[str]:
    """How the figures name what made the ranking: the post-processing, then each re-ranking."""
    return [post.label, *(x for x in (conf.kreciprocal.label, conf.reranking.label) if x)]


def _kreciprocal(
    settings: KReciprocalSettings, ready: tuple[np.ndarray, np.ndarray], used: RetrievalSet
) -> list[QueryRerank]:
    """Every query's ranking of the whole database by k-reciprocal distance (``ready``: the
    database and queries post-processed)."""
    db, queries = ready
    if settings.kreciprocal_top:
        shortlists = rank_by_similarity(queries, db, topk=min(settings.kreciprocal_top, len(db)))
        orders = [
            row[shortlist_order(q, db[row], settings.options)]
            for q, row in zip(queries, shortlists, strict=True)
        ]
    else:
        found = kreciprocal_distances(
            queries,
            db,
            settings.options,
            queries_are_database=used.queries_are_database,
            max_photos=settings.kreciprocal_max_photos,
            progress=True,
        )
        orders = [np.argsort(distances, kind="stable") for distances in found]
    none = np.zeros(0, np.int64)
    return [QueryRerank(none, {}, q, 0, order=o) for q, o in zip(queries, orders, strict=True)]


def _rerank(
    conf: EvaluateConf,
    described: DescribedSet,
    ready: tuple[np.ndarray, np.ndarray],
    *,
    before: list[QueryRerank] | None,
) -> tuple[RerankedSet, dict[str, Any]]:
    """Spatial re-ranking of every query's top ``--rerank``, and what to keep of it: its cost
    and each query's verified results with their inliers."""
    used = described.rset
    db, queries = ready
    done = rerank_set(
        db,
        queries,
        used,
        db_paths=described.db_paths,
        cache=LocalFeatureCache(Path(conf.cache_dir) / "local", conf.local),
        settings=conf.reranking,
        kappas=conf.kappas,
        num_workers=conf.num_workers,
        before=before,
    )
    kept = {
        **done.cost,
        "verified_per_query": [len(r.promoted) for r in done.queries],
        "verified": {
            _name(used.query_paths[j]): {
                _name(described.db_paths[row]): count for row, count in _verified(r).items()
            }
            for j, r in enumerate(done.queries)
        },
    }
    return done, kept


def _verified(reranked: QueryRerank) -> dict[int, int]:
    return {row: reranked.inliers[row] for row in reranked.promoted.tolist()}


def _name(path: Path) -> str:
    return path.stem if path.parent.name == "jpg" else f"{path.parent.name}/{path.name}"


def _describe(
    conf: EvaluateConf, net: RetrievalNet, network_key: dict[str, Any]
) -> tuple[DescribedSet, dict[str, Any]]:
    """The data set (staged from S3 once) and its distractors described by ``net``, through
    the descriptor cache; and the extraction's identity. No usable queries or database
    photos is an error naming what is missing."""
    cache = Path(conf.cache_dir)
    dataset_dir = _stage(
        storage.join(conf.data_root, conf.dataset),
        cache,
        "data set",
        expected="; expected <data-root>/<dataset>/jpg and <data-root>/<dataset>/gnd_<dataset>.pkl",
    )
    options = ExtractOptions(
        scales=conf.network.scales,
        batch_size=conf.batch_size,
        num_workers=conf.num_workers,
        device=conf.device,
    )
    identity = {**network_key, **options.identity(), "max_size": conf.network.max_size}
    distractors, distractor_root = _distractors(conf, cache)
    described = describe_set(
        _load_set(dataset_dir, conf.dataset),
        net.backbone,
        {"descriptor": net.head},
        max_size=conf.network.max_size,
        options=options,
        cache=DescriptorCache(cache / "descriptors" / conf.dataset, identity),
        root=dataset_dir,
        distractors=distractors,
        distractor_root=distractor_root,
    )
    used = described.rset
    if not used.query_paths or not used.db_paths:
        missing = "queries" if used.db_paths else "database images"
        summary = described.availability.summary()
        raise FileNotFoundError(f"{dataset_dir}: no usable {missing}; {summary}")
    return described, identity


def _load_set(dataset_dir: Path, name: str) -> RetrievalSet:
    """The revisited layout, or a folder of scene folders (every photo a query, the other
    photos of its scene its positives)."""
    revisited = (dataset_dir / f"gnd_{name}.pkl").exists() or (dataset_dir / "jpg").exists()
    if not revisited and any(d.is_dir() and list_images(d) for d in dataset_dir.iterdir()):
        return load_folder(dataset_dir)
    return load_revisited(dataset_dir, name)


def _check(conf: EvaluateConf) -> None:
    """What can be checked before any photo is read."""
    if not conf.kappas or min(conf.kappas) < 1:
        raise ValueError(f"--kappas must be positive integers, got {list(conf.kappas)}")


def _stage(uri: str, cache: Path, what: str, *, expected: str = "") -> Path:
    """A local folder with the content of ``uri`` (staged from S3 once), or why not."""
    try:
        return storage.stage_to_local(uri, cache)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {uri}{expected}") from None


def _distractors(conf: EvaluateConf, cache: Path) -> tuple[list[Path], Path | None]:
    if not conf.distractors:
        return [], None
    folder = _stage(conf.distractors, cache, "distractor folder")
    paths = [Path(p) for p in storage.list_files(folder, suffixes=IMAGE_SUFFIXES)]
    if not paths:
        raise FileNotFoundError(
            f"no distractor photos ({', '.join(IMAGE_SUFFIXES)}) under {conf.distractors}"
        )
    return paths, folder


def _post_process(conf: EvaluateConf, loaded: checkpoint.Checkpoint | None) -> PostProcess:
    """``--whitening``, else the checkpoint's own (unless ``--no-checkpoint-whitening``)."""
    params = None
    if conf.whitening:
        params = load_whitening(conf.whitening)
    elif conf.checkpoint_whitening and loaded is not None:
        params = loaded.whitening
    whitening = (params.m, params.P) if params is not None else None
    return PostProcess(whitening, conf.whitening_dim, conf.qe)


def _network(
    conf: EvaluateConf, loaded: checkpoint.Checkpoint | None
) -> tuple[RetrievalNet, dict[str, Any]]:
    """The network and what identifies its descriptors for the cache (a checkpoint: its
    content hash, so a retrained checkpoint in the same folder is described again)."""
    if loaded is not None:
        net = loaded.network
        identity = {"checkpoint": loaded.identity}
    else:
        torch.manual_seed(conf.seed)
        network = conf.network
        meta = NetworkMeta(backbone=network.backbone, pooling=network.pooling, p=network.p)
        net = build_network(meta, None if network.weights == "random" else network.weights)
        identity = {
            "backbone": meta.backbone,
            "weights": _weights_identity(network.weights, conf.seed),
            "pooling": meta.pooling,
            "p": meta.p,
        }
    return net.eval(), identity


def _weights_identity(weights: str, seed: int) -> str:
    if weights == "random":
        return f"random-seed{seed}"
    if weights == "imagenet" or weights.isupper():
        return weights
    return storage.file_signature(weights)


def _queries_without_positives(rset: RetrievalSet) -> int:
    return sum(1 for j in range(len(rset.query_paths)) if not rset.positives(j).size)


if __name__ == "__main__":
    run_cli(run, EvaluateConf)
