"""The train stage, GeM mode: fine-tune on the SfM pairs with hard negatives mined each epoch.

    python -m pipeline.train --pairs OUT/pairs --images OUT/images.parquet --output OUT/train

Ray Train V2's ``TorchTrainer`` runs ``--workers`` DDP workers (gloo on CPUs, NCCL on GPUs).
Each epoch, as the GeM paper does but over the whole pool instead of a random few thousand:

1. every worker describes its share of the negative pool (``pool.parquet``: every photo with a
   cluster) with the current network, without gradients, at ``--image-size``, and sends the
   descriptors to the mining-index actor (``cluster.mining``);
2. the epoch's queries (``--queries`` of them, drawn with the epoch's seed) are shared out; each
   worker asks the actor for ``--nnum`` hard negatives of its queries (nearest of other
   clusters, one per cluster) and draws one positive per query (``pipeline.tuples``);
3. tuples train with the contrastive loss (``--margin``), Adam, GeM's p at 10× the learning
   rate without weight decay, exponential decay of the rate, BatchNorm frozen (``--freeze-bn``);
4. rank 0 scores the held-out clusters (``--held-out`` of the queries' clusters, never trained
   on): mAP of each held-out query against the whole pool, its own cluster's photos positive;
5. every worker reports ``loss``, ``val_map``, ``seconds``, ``tuples_per_s``; rank 0 attaches
   the checkpoint (``model.pt`` and ``meta.json``, the layout ``extract`` and ``evaluate`` take,
   plus ``train_state.pt`` to resume).

A rerun with the same ``--name`` and storage resumes from the latest checkpoint; worker failures
are retried (``--max-failures``). At the end the best epoch's checkpoint (by ``val_map``; the
off-the-shelf network is epoch 0) is copied to ``OUTPUT`` (``model.pt``, ``meta.json``: pass
``--weights OUTPUT`` to extract or evaluate) with ``metrics.json`` (every epoch, the best
marked) and ``curves.png`` beside it; Ray Train's own checkpoints stay under ``OUTPUT/ray``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cli import location_problems, run_cli

__all__ = ["TrainConf", "run"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConf:
    """Settings of one training run; every field is a command-line flag."""

    pairs: str
    """The folder written by pipeline.pairs (pairs.parquet, pool.parquet)."""
    images: str
    """images.parquet written by pipeline.ingest (the photos' bytes)."""
    output: str
    """Local folder: the best checkpoint (model.pt, meta.json), metrics.json, curves.png."""
    weights: str = "imagenet"
    """Start from ImageNet Lite0 + GeM, or from a checkpoint directory."""
    name: str = "cirray-train"
    storage_path: str | None = None
    """Ray Train's storage (local or s3://); default OUTPUT/ray. Same name + storage: resume."""
    workers: int = 1
    use_gpu: bool = False
    epochs: int = 5
    lr: float = 1e-6
    """Adam's rate: small, as fine-tuning ImageNet weights on few photos wants."""
    lr_decay: float = math.exp(-0.01)
    """Per epoch, as the GeM paper's exp(-0.01)."""
    weight_decay: float = 1e-6
    margin: float = 0.7
    """Contrastive margin: 0.7 for Lite0's GeM descriptors (the paper: 0.85 for ResNet-101)."""
    nnum: int = 5
    queries: int = 2000
    """Queries per epoch (all when there are fewer)."""
    tuples_per_step: int = 5
    """Tuples per optimizer step per worker (the reference's batch of 5)."""
    image_size: int = 362
    freeze_bn: bool = True
    held_out: float = 0.2
    """Share of the queries whose clusters are held out for validation."""
    max_failures: int = 1
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# The worker's side


def _decode_all(conf: dict[str, Any], image_ids: list[str]) -> list[np.ndarray]:
    """Upright RGB ``uint8`` photos at ``image_size`` a side, in ``image_ids`` order."""
    from cluster.catalog import ImageCatalog, read_photo_bytes
    from pipeline.extract import decode_photo

    catalog = ImageCatalog()
    catalog.read_table(conf["images"])
    data = read_photo_bytes([catalog.photo(i) for i in image_ids])
    photos = []
    for image_id in image_ids:
        photo = decode_photo(data[image_id], conf["image_size"])
        if not isinstance(photo, np.ndarray):
            raise ValueError(f"photo {image_id} cannot be decoded: {photo}")
        photos.append(photo)
    return photos


def _tensor(photo: np.ndarray, net: Any, device: Any) -> Any:
    import torch

    mean = torch.tensor(net.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(net.std, device=device).view(1, 3, 1, 1) * 255
    x = torch.as_tensor(photo, device=device).permute(2, 0, 1)[None].float()
    return (x - mean) / std


def _describe(net: Any, photos: list[np.ndarray], rows: np.ndarray, device: Any) -> np.ndarray:
    import torch

    net.eval()
    with torch.no_grad():
        out = [net(_tensor(photos[r], net, device))[0].float().cpu().numpy() for r in rows]
    return np.stack(out) if out else np.zeros((0, net.out_dim), np.float32)


def _freeze_batchnorm(net: Any) -> None:
    import torch

    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def _cluster_map(vectors: np.ndarray, clusters: np.ndarray, queries: np.ndarray) -> float:
    """mAP of each query against the pool (itself left out), its cluster's photos positive."""
    from model.evaluation import compute_map

    scores = vectors @ vectors[queries].T
    ranks = np.argsort(-scores, axis=0, kind="stable")
    gnd = [
        {"ok": np.flatnonzero((clusters == clusters[q]) & (np.arange(len(clusters)) != q)),
         "junk": np.array([q])}
        for q in queries.tolist()
    ]  # fmt: skip
    return float(compute_map(ranks, gnd)[0])


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker (``config``: the TrainConf as a dict, plus the actor and data)."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from model.losses import ContrastiveLoss
    from model.networks import parameter_groups, save_network
    from pipeline.tuples import epoch_tuples, split_clusters, worker_share

    conf = config["conf"]
    data = config["data"]
    mining = config["mining"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    print(f"cirray-train {conf['name']} rank {rank} of {world} pid {os.getpid()}", flush=True)
    torch.manual_seed(conf["seed"])
    device = ray.train.torch.get_device()
    net = _initial_network(conf).to(device)
    train, val = split_clusters(data, conf["held_out"], conf["seed"])
    photos = _decode_all(conf, data.image_ids.tolist())
    row_of = {image_id: i for i, image_id in enumerate(data.image_ids.tolist())}
    train_rows = np.array([row_of[i] for i in train.image_ids], np.int64)
    val_rows = np.array([row_of[i] for i in val.image_ids], np.int64)
    everything = np.arange(len(data.image_ids))

    def validate() -> float:
        """Held-out queries against the whole pool (their own clusters' photos positive)."""
        vectors = _describe(net, photos, everything, device)
        return _cluster_map(vectors, data.clusters, val_rows[val.queries])

    optimizer = torch.optim.Adam(
        parameter_groups(net, conf["lr"], conf["weight_decay"]), lr=conf["lr"]
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=conf["lr_decay"])
    start_epoch, steps, val_map_start = 1, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "train_state.pt", map_location=device)
            net.load_state_dict(torch.load(Path(folder) / "model.pt", map_location=device))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, steps, val_map_start = (
            state["epoch"] + 1,
            state["steps"],
            state["val_map_start"],
        )
    elif rank == 0:  # epoch 0: the network before any step
        val_map_start = validate()
    model = ray.train.torch.prepare_model(net) if world > 1 else net
    loss_fn = ContrastiveLoss(margin=conf["margin"])

    for epoch in range(start_epoch, conf["epochs"] + 1):
        started = time.perf_counter()
        rng = np.random.default_rng(conf["seed"] * 1000 + epoch)  # the same on every worker
        chosen = np.sort(rng.permutation(len(train.queries))[: conf["queries"]])
        # 1. the negative pool, each worker its share
        if rank == 0:
            ray.get(mining.reset.remote(epoch, len(train_rows)))
        _barrier(dist, world)
        share = worker_share(len(train_rows), rank, world)
        vectors = _describe(net, photos, train_rows[share], device)
        ray.get(mining.add.remote(share, vectors, train.clusters[share]))
        _barrier(dist, world)
        # 2. this worker's queries, their negatives and positives
        mine = chosen[worker_share(len(chosen), rank, world)]
        query_rows = train.queries[mine]
        negatives, _ = ray.get(
            mining.mine.remote(
                _describe(net, photos, train_rows[query_rows], device),
                train.clusters[query_rows],
                conf["nnum"],
            )
        )
        subset = train.__class__(
            train.image_ids, train.clusters, query_rows, tuple(train.positives[i] for i in mine)
        )
        tuples = epoch_tuples(subset, negatives, rng)
        batches = len(tuples) // conf["tuples_per_step"]
        batches = _min_over_workers(dist, world, batches, device)  # DDP: the same steps for all
        # 3. train
        model.train()
        if conf["freeze_bn"]:
            _freeze_batchnorm(model)
        total = 0.0
        for b in range(batches):
            batch = tuples[b * conf["tuples_per_step"] : (b + 1) * conf["tuples_per_step"]]
            optimizer.zero_grad()
            outs = torch.stack([
                torch.cat([model(_tensor(photos[train_rows[r]], net, device)) for r in t])
                for t in batch.tolist()
            ])  # fmt: skip
            loss = loss_fn(outs)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
        scheduler.step()
        seconds = time.perf_counter() - started
        # 4. validation and 5. report
        val_map = None
        if rank == 0:
            val_map = validate()
        metrics = {
            "epoch": epoch,
            "loss": total / max(1, batches * conf["tuples_per_step"]),
            "val_map": val_map,
            "seconds": seconds,
            "tuples_per_s": batches * conf["tuples_per_step"] / seconds,
            "steps": steps,
            "val_map_start": val_map_start,
        }
        if rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                save_network(net, folder)
                torch.save({"optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch,
                            "steps": steps, "val_map_start": val_map_start},
                           Path(folder) / "train_state.pt")  # fmt: skip
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)


def _barrier(dist: Any, world: int) -> None:
    if world > 1:
        dist.barrier()


def _min_over_workers(dist: Any, world: int, value: int, device: Any) -> int:
    if world == 1:
        return value
    import torch

    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _initial_network(conf: dict[str, Any]) -> Any:
    from model.networks import NetworkMeta, build_network, load_network

    if conf["weights"] != "imagenet":
        return load_network(conf["weights"])
    return build_network(NetworkMeta(backbone="efficientnet_lite0", pooling="gem", p=3.0,
                                     learn_p=True), "imagenet")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The driver's side


def _check(conf: TrainConf) -> None:
    problems = []
    for name in ("workers", "epochs", "nnum", "queries", "tuples_per_step"):
        if getattr(conf, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    if conf.lr <= 0:
        problems.append(f"--lr must be positive, not {conf.lr}")
    if not 0 < conf.held_out < 1:
        problems.append(f"--held-out is a share in (0, 1), not {conf.held_out}")
    if conf.image_size < 64:
        problems.append(f"--image-size must be at least 64, not {conf.image_size}")
    problems += location_problems(pairs=conf.pairs, images=conf.images)
    if problems:
        raise ValueError("\n".join(problems))


def run(conf: TrainConf) -> str:
    """Train; returns ``OUTPUT``, which holds the best epoch's checkpoint."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.mining import mining_actor
    from pipeline.tuples import read_training_set

    _check(conf)
    data = read_training_set(conf.pairs)
    if not ray.is_initialized():
        ray.init()
    out = Path(conf.output)
    storage_path = conf.storage_path or str((out / "ray").resolve())
    mining = mining_actor(num_cpus=0, gpu=conf.use_gpu)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"conf": asdict(conf), "data": data, "mining": mining},
        scaling_config=ScalingConfig(num_workers=conf.workers, use_gpu=conf.use_gpu),
        run_config=RunConfig(
            name=conf.name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=conf.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    result = trainer.fit()
    ray.kill(mining)
    return _finish(conf, result, out)


def _finish(conf: TrainConf, result: Any, out: Path) -> str:
    import shutil

    history = _history(result)
    scored = [h for h in history if h.get("val_map") is not None]
    best = max(scored, key=lambda h: (h["val_map"], -h["epoch"]))
    for h in history:
        h["best"] = h["epoch"] == best["epoch"]
    target = out  # the checkpoint layout itself: --weights OUTPUT for extract and evaluate
    target.mkdir(parents=True, exist_ok=True)
    for stale in ("meta.json", "model.pt", "whitening.npz"):  # meta first: never a mixed pair
        (target / stale).unlink(missing_ok=True)
    if best["epoch"] == 0:
        logger.warning("no epoch beat the network it started from; keeping that one")
        from model.networks import save_network

        save_network(_initial_network(asdict(conf)), target)
    else:
        checkpoint = next(c for c, m in result.best_checkpoints if m["epoch"] == best["epoch"])
        with checkpoint.as_directory() as folder:
            shutil.copy2(Path(folder) / "model.pt", target / "model.pt")
            shutil.copy2(Path(folder) / "meta.json", target / "meta.json")
    payload = {"settings": asdict(conf), "epochs": history, "best_epoch": best["epoch"]}
    (target / "metrics.json").write_text(json.dumps(payload, indent=2))
    _curves(history, target / "curves.png")
    logger.info(
        "best epoch %d: validation mAP %.4f (epoch 0: %s) → %s",
        best["epoch"],
        best["val_map"],
        next((h["val_map"] for h in history if h["epoch"] == 0), None),
        target,
    )
    return str(target)


def _history(result: Any) -> list[dict[str, Any]]:
    """One row per epoch from the checkpoints' metrics (rank 0's), epoch 0 the start."""
    rows = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["epoch"])
    keys = ("epoch", "loss", "val_map", "seconds", "tuples_per_s", "steps")
    history = [{k: m.get(k) for k in keys} for m in rows]
    if rows:
        start = {"epoch": 0, "loss": None, "val_map": rows[0].get("val_map_start"),
                 "seconds": 0.0, "tuples_per_s": None, "steps": 0}  # fmt: skip
        history.insert(0, start)
    return history


def _curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    trained = [h for h in history if h["loss"] is not None]
    left.plot([h["epoch"] for h in trained], [h["loss"] for h in trained], "o-")
    left.set(xlabel="epoch", ylabel="contrastive loss per tuple", title="training loss")
    scored = [h for h in history if h["val_map"] is not None]
    right.plot([h["epoch"] for h in scored], [h["val_map"] for h in scored], "o-")
    best = max(scored, key=lambda h: h["val_map"])
    right.plot([best["epoch"]], [best["val_map"]], "r*", markersize=14, label="best")
    right.set(xlabel="epoch", ylabel="mAP", title="validation (held-out clusters)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    run_cli(run, TrainConf)
