"""The evaluate stage: Revisited Oxford/Paris (and any set in their layout) from a folder or S3.

    python -m pipeline.evaluate --dataset roxford5k --data-root /data/revisitop \
        --backbone efficientnet_lite0 --weights imagenet --scales 1 0.7071 0.5 --qe-k 2

The layout is cnnimageretrieval-pytorch's: ``<root>/<dataset>/jpg/<name>.jpg`` and
``<root>/<dataset>/gnd_<dataset>.pkl``. Queries are their photos cropped to ``bbx``; database
images are resized to ``max_size`` (never enlarged) and a query crop by its whole photo's
factor. A partial copy is evaluated on what is there, with counts. Descriptors are cached per
image under a key of (data set, network, weights, settings), so trying αQE or whitening
variants never extracts again.

``score`` is the one place where whitening and αQE are applied before ranking and where the
protocol of a ``RetrievalSet`` picks the metric: Easy/Medium/Hard mAP and mP@k for revisited
sets, mAP and recall@k for scene folders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tyro

from cluster.storage import file_signature, read_bytes, stage_to_local
from model.evaluation import compute_map, evaluate_revisited, recall_at_k
from model.extraction import ExtractOptions, ImageFiles, extract_descriptors
from model.networks import NetworkMeta, RetrievalNet, build_network, load_network
from model.retrieval import alpha_qe, rank_by_similarity
from model.whitening import apply_whitening, load_whitening
from pipeline.benchmarks import (
    IMAGE_SUFFIXES,
    RetrievalSet,
    load_revisited,
    present_subset,
)
from pipeline.report import write_report
from pipeline.results import write_json

__all__ = ["EvaluateConf", "PostProcess", "format_revisited", "run", "score", "summary_map"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PostProcess:
    """What happens to descriptors between extraction and ranking."""

    whitening: tuple[np.ndarray, np.ndarray] | None = None  # (m, P) of learned whitening
    whitening_dim: int | None = None
    qe_k: int = 0  # αQE neighbours; 0 for none
    qe_alpha: float = 3.0

    @property
    def label(self) -> str:
        parts = ["Lw" if self.whitening is not None else ""]
        if self.qe_k:
            parts.append(f"αQE(k={self.qe_k}, α={self.qe_alpha:g})")
        return " + ".join(p for p in parts if p) or "plain"


def score(
    db: np.ndarray,
    queries: np.ndarray,
    rset: RetrievalSet,
    post: PostProcess = PostProcess(),
    kappas: tuple[int, ...] = (1, 5, 10),
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics and the ranking ``[n_q, n_db]`` (a row per query, best first)."""
    if post.whitening is not None:
        m, P = post.whitening
        db = apply_whitening(db, m, P, post.whitening_dim)
        queries = apply_whitening(queries, m, P, post.whitening_dim)
    if post.qe_k:
        queries = alpha_qe(queries, db, k=post.qe_k, alpha=post.qe_alpha)
    ranks = rank_by_similarity(queries, db)
    if rset.protocol == "revisited":
        return evaluate_revisited(ranks.T, rset.gnd, kappas), ranks
    if rset.protocol == "scenes":
        m_ap, _, mpr, _ = compute_map(ranks.T, rset.gnd, kappas)
        # Recall@k must not count the query itself, which ranks first among its own photos.
        others = np.stack([row[row != j] for j, row in enumerate(ranks)])
        recalls = recall_at_k(others, rset.db_labels, rset.db_labels, kappas)
        metrics = {"map": m_ap, "mp@k": dict(zip(kappas, map(float, mpr), strict=True))}
        return {**metrics, "recall@k": recalls}, ranks
    return {}, ranks


def summary_map(metrics: dict[str, Any]) -> dict[str, float]:
    """The mAP figures of a metrics dict: ``{"E","M","H"}`` or ``{"mAP"}``."""
    if "medium" in metrics:
        return {k[0].upper(): metrics[k]["map"] for k in ("easy", "medium", "hard")}
    return {"mAP": metrics["map"]} if "map" in metrics else {}


@dataclass(frozen=True)
class EvaluateConf:
    """Settings of one evaluation; every field is a command-line flag."""

    dataset: str
    """roxford5k, rparis6k, or any data set in their layout."""
    data_root: str
    """Folder or s3:// prefix holding <dataset>/jpg and <dataset>/gnd_<dataset>.pkl."""
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    """imagenet, random, a weights file (path or s3://), or a training checkpoint directory
    (with meta.json), which brings its own backbone and head."""
    pooling: str = "gem"
    p: float = 3.0
    scales: tuple[float, ...] = (1.0,)
    """1 0.7071 0.5 for the GeM paper's multi-scale descriptors."""
    max_size: int = 1024
    whitening: str | None = None
    """Learned whitening (.npz from model.whitening.save_whitening), path or s3://."""
    whitening_dim: int | None = None
    qe_k: int = 0
    """αQE neighbours; 0 switches query expansion off."""
    qe_alpha: float = 3.0
    distractors: str | None = None
    """Folder or s3:// prefix of distractor photos (R1M style) added to the database."""
    kappas: tuple[int, ...] = (1, 5, 10)
    output: str = "outputs/evaluate"
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
    cache = Path(conf.cache_dir)
    dataset_dir = stage_to_local(f"{conf.data_root.rstrip('/')}/{conf.dataset}", cache)
    full = load_revisited(dataset_dir, conf.dataset)
    rset, availability = present_subset(full)
    if not rset.query_paths or not rset.db_paths:
        raise FileNotFoundError(
            f"{dataset_dir}: no usable {'queries' if rset.db_paths else 'database images'} "
            f"({json.dumps(availability.as_dict())})"
        )
    net, network_key = _network(conf)
    db, queries, distractor_paths, extracted = _describe(conf, rset, net, network_key, cache)
    post = _post_process(conf)
    metrics, ranks = score(db, queries, rset, post, conf.kappas)
    print(format_revisited(conf.dataset, metrics, conf.kappas))

    result = {
        "dataset": conf.dataset,
        "metrics": metrics,
        "settings": dataclasses.asdict(conf),
        "network": network_key,
        "post_processing": post.label,
        "images": {**availability.as_dict(), "distractors": len(distractor_paths)},
        "queries_without_positives": _queries_without_positives(rset),
        "extracted": extracted,
        "seconds": round(time.perf_counter() - started, 2),
    }
    out = Path(conf.output) / conf.dataset / _digest(json.dumps(result["settings"]))
    write_json(out / "metrics.json", result)
    write_report(
        out / "report.html",
        rset,
        ranks,
        metrics,
        db_paths=[*rset.db_paths, *distractor_paths],
        title=f"{conf.dataset}: {network_key.get('backbone', conf.weights)}, {post.label}",
    )
    _report_availability(availability.as_dict())
    print(f"metrics: {out / 'metrics.json'}\nreport:  {out / 'report.html'}")
    return result


def _describe(
    conf: EvaluateConf,
    rset: RetrievalSet,
    net: RetrievalNet,
    network_key: dict[str, Any],
    cache: Path,
) -> tuple[np.ndarray, np.ndarray, list[Path], dict[str, int]]:
    """Database (with distractors appended) and query descriptors, through the cache."""
    options = ExtractOptions(
        scales=conf.scales,
        batch_size=conf.batch_size,
        num_workers=conf.num_workers,
        device=conf.device,
    )
    store = DescriptorCache(cache / "descriptors", conf.dataset, network_key)
    db, n_db = store.get("db", rset.db_paths, None, net, conf.max_size, options)
    queries, n_q = store.get(
        "query", rset.query_paths, rset.query_boxes, net, conf.max_size, options
    )
    extracted = {"db": n_db, "queries": n_q, "distractors": 0}
    if not conf.distractors:
        return db, queries, [], extracted
    paths = _distractor_paths(conf.distractors, cache)
    d_store = DescriptorCache(cache / "descriptors", "distractors", network_key)
    role = f"distractors-{_digest(conf.distractors)}"
    distractors, extracted["distractors"] = d_store.get(
        role, paths, None, net, conf.max_size, options
    )
    return np.concatenate([db, distractors]), queries, paths, extracted


def _post_process(conf: EvaluateConf) -> PostProcess:
    whitening = None
    if conf.whitening:
        params = load_whitening(io.BytesIO(read_bytes(conf.whitening)))
        whitening = (params.m, params.P)
    return PostProcess(whitening, conf.whitening_dim, conf.qe_k, conf.qe_alpha)


def format_revisited(dataset: str, metrics: dict[str, Any], kappas: tuple[int, ...]) -> str:
    """The papers' two lines: mAP E/M/H and mP@k E/M/H, in percent with one decimal."""
    parts = ("easy", "medium", "hard")
    maps = ", ".join(f"{p[0].upper()}: {100 * metrics[p]['map']:.1f}" for p in parts)
    prs = ", ".join(
        f"{p[0].upper()}: {[round(100 * metrics[p]['mp@k'][k], 1) for k in kappas]}" for p in parts
    )
    return f">> {dataset}: mAP {maps}\n>> {dataset}: mP@k{list(kappas)} {prs}"


class DescriptorCache:
    """Descriptors per image, kept in one ``.npz`` per (data set, network key, role).

    Only images not yet in the cache are extracted; the file is replaced atomically.
    """

    def __init__(self, root: Path, dataset: str, network_key: dict[str, Any]) -> None:
        self.folder = root / dataset / _digest(json.dumps(network_key, sort_keys=True))
        self.network_key = network_key

    def get(
        self,
        role: str,
        paths: list[Path],
        boxes: list | None,
        net: RetrievalNet,
        max_size: int,
        options: ExtractOptions,
    ) -> tuple[np.ndarray, int]:
        """Descriptors of ``paths`` in order, and how many had to be extracted now."""
        keys = [
            p.name if not boxes or boxes[i] is None else f"{p.name}@{list(boxes[i])}"
            for i, p in enumerate(paths)
        ]
        file = self.folder / f"{role}-{max_size}.npz"
        known: dict[str, np.ndarray] = {}
        if file.is_file():
            with np.load(file) as saved:
                known = dict(zip(saved["keys"].tolist(), saved["vectors"], strict=True))
        todo = [i for i, key in enumerate(keys) if key not in known]
        if todo:
            logger.info("%s: extracting %d of %d images", role, len(todo), len(keys))
            images = ImageFiles(
                [paths[i] for i in todo],
                max_size,
                [boxes[i] for i in todo] if boxes else None,
            )
            fresh = extract_descriptors(net, images, options)
            known.update(zip((keys[i] for i in todo), fresh, strict=True))
            self._save(file, known)
        else:
            logger.info("%s: all %d descriptors from the cache %s", role, len(keys), file)
        return np.stack([known[key] for key in keys]).astype(np.float32), len(todo)

    def _save(self, file: Path, known: dict[str, np.ndarray]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "network.json").write_text(json.dumps(self.network_key, indent=2))
        tmp = file.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(list(known)), vectors=np.stack(list(known.values())))
        os.replace(tmp, file)


def _network(conf: EvaluateConf) -> tuple[RetrievalNet, dict[str, Any]]:
    """The network and what identifies its descriptors for the cache."""
    if _is_checkpoint(conf.weights):
        net = load_network(conf.weights)
        identity = {"checkpoint": file_signature(f"{conf.weights.rstrip('/')}/model.pt")}
    else:
        torch.manual_seed(conf.seed)
        weights = None if conf.weights == "random" else conf.weights
        meta = NetworkMeta(backbone=conf.backbone, pooling=conf.pooling, p=conf.p)
        net = build_network(meta, weights)
        identity = {
            "backbone": conf.backbone,
            "weights": _weights_identity(conf.weights, conf.seed),
            "pooling": conf.pooling,
            "p": conf.p,
        }
    return net.eval(), {**identity, "scales": list(conf.scales)}


def _is_checkpoint(weights: str) -> bool:
    """A training checkpoint is a directory (local or remote) with a ``meta.json``."""
    if weights in ("imagenet", "random"):
        return False
    try:
        json.loads(read_bytes(f"{weights.rstrip('/')}/meta.json"))
    except (FileNotFoundError, NotADirectoryError, OSError, ValueError):
        return False
    return True


def _weights_identity(weights: str, seed: int) -> str:
    if weights == "random":
        return f"random-seed{seed}"
    if weights == "imagenet" or weights.isupper():
        return weights
    return file_signature(weights)


def _distractor_paths(uri: str, cache: Path) -> list[Path]:
    folder = stage_to_local(uri, cache)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no distractor photos under {uri}")
    return paths


def _queries_without_positives(rset: RetrievalSet) -> int:
    return sum(1 for g in rset.gnd or [] if len(g["easy"]) + len(g["hard"]) == 0)


def _report_availability(images: dict[str, Any]) -> None:
    line = (
        f"database: {images['db_used']} of {images['db_total']} images"
        f" ({images['db_missing']} missing)"
        f"; queries: {images['queries_used']} of {images['queries_total']}"
        f" ({images['queries_missing']} missing)"
    )
    if images["unreadable"]:
        line += f"; {len(images['unreadable'])} unreadable: " + ", ".join(images["unreadable"])
    if images.get("distractors"):
        line += f"; {images['distractors']} distractors"
    print(line)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run(tyro.cli(EvaluateConf))
