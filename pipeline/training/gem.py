"""GeM mode, one worker's side: hard negatives mined from the whole pool, contrastive tuples.

Each epoch, as the GeM paper does but over the whole pool instead of a random few thousand:

1. every worker describes its share of the negative pool (the training clusters' photos, or a
   seeded sample of ``pool_size`` of them that holds the epoch's queries) with the current
   network, without gradients, and sends the descriptors to the mining-index actor
   (``cluster.mining``);
2. the actor mines ``nnum`` hard negatives (nearest of other clusters, one per cluster) for the
   epoch's queries once, from the descriptors it holds, and every worker takes the same answer;
3. the epoch's tuples (query, a random positive, its negatives) come from one seeded draw shared
   by all workers: every optimizer step trains on the same global batch of ``tuples_per_step``
   tuples whatever the number of workers, each worker computing every ``world``-th of them. The
   contrastive loss is a sum over tuples and DDP averages gradients, so each worker scales its
   share's loss by ``world``: the step's gradient is the global batch's, exactly;
4. rank 0 scores the held-out clusters: mAP of each held-out query against the whole pool, its
   own cluster's photos positive (every positive counts, as in the revisited protocol's Medium
   setup; there are no junk labels), without and with the Lw learned from the training
   clusters' whitening pairs at the same resolution.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from model.evaluation import cluster_map
from pipeline.training.collective import barrier, report_progress, sum_over_workers
from pipeline.training.images import decode_photos, embed, freeze_batchnorm, mean_std
from pipeline.tuples import TrainingSet, epoch_tuples, split_clusters, worker_share

__all__ = ["GemEpochs"]


class GemEpochs:
    """Validation and epochs of the GeM mode for one worker (``rank`` of ``world``)."""

    score = "val_map"

    def __init__(self, conf: dict[str, Any], data: dict[str, Any], precision: Any,
                 device: Any, rank: int, world: int) -> None:  # fmt: skip
        self.conf, self.precision, self.device = conf, precision, device
        self.rank, self.world = rank, world
        self.mining = data["mining"]
        pool: TrainingSet = data["training_set"]
        self.pool, self.clusters = pool, pool.clusters
        self.train, self.val = split_clusters(pool, conf["held_out"], conf["seed"])
        ids = pool.image_ids.tolist()
        self.photos = decode_photos(conf["images"], ids, conf["image_size"])
        row_of = {image_id: i for i, image_id in enumerate(ids)}
        self.train_rows = np.array([row_of[i] for i in self.train.image_ids], np.int64)
        self.val_queries = np.array([row_of[i] for i in self.val.image_ids], np.int64)[
            self.val.queries
        ]
        # Lw sees the training clusters only: their pairs, and their photos as the scatter C_D
        trained = set(self.train.image_ids.tolist())
        self.lw_pairs = [(q, p) for q, p in data["whitening_pairs"]
                         if q in trained and p in trained]  # fmt: skip

    def validate(self, net: Any) -> dict[str, float]:
        """Held-out queries against the whole pool, plain and with Lw (at training size):
        the training stage's final Lw step, on this epoch's vectors."""
        import torch

        from pipeline.whiten import held_out_whitening

        with torch.no_grad():
            net.eval()
            vectors = embed(net, self.photos, mean_std(net, self.device), self.precision,
                            self.device).cpu().numpy()  # fmt: skip
        if len(self.lw_pairs) < 10:  # fewer only overfits: no figure rather than a noisy one
            return {"val_map": cluster_map(vectors, self.clusters, self.val_queries)}
        conf = self.conf
        *_, how = held_out_whitening(self.pool.image_ids, vectors, self.pool, self.lw_pairs,
                                     conf["held_out"], conf["seed"], conf["whiten_shrinkage"],
                                     conf["whiten_dim"])  # fmt: skip
        return {"val_map": how["val_map"], "val_map_lw": how["val_map_lw"]}

    def _pool(self, query_rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The epoch's negative pool: every training photo, or ``pool_size`` of them drawn
        with the epoch's seed, the epoch's queries always among them (sorted rows)."""
        everyone = np.arange(len(self.train_rows))
        size = self.conf["pool_size"]
        if not size or size >= len(everyone):
            return everyone
        queries = np.unique(query_rows)
        others = np.setdiff1d(everyone, queries)
        extra = rng.choice(others, min(len(others), max(0, size - len(queries))), replace=False)
        return np.sort(np.concatenate([queries, extra]))

    def epoch(self, model: Any, net: Any, optimizer: Any, epoch: int) -> dict[str, float]:
        """One epoch; returns its ``loss`` (per tuple), ``items`` (tuples) and ``steps``."""
        import ray
        import torch

        from model.losses import ContrastiveLoss

        conf, rank, world = self.conf, self.rank, self.world
        rng = np.random.default_rng(conf["seed"] * 1000 + epoch)  # the same on every worker
        chosen = np.sort(rng.permutation(len(self.train.queries))[: conf["queries"]])
        normalise = mean_std(net, self.device)
        query_rows = self.train.queries[chosen]
        pool = self._pool(query_rows, rng)  # training-set rows the actor holds, in order
        # 1. the negative pool, each worker its share
        if rank == 0:
            ray.get(self.mining.reset.remote(epoch, len(pool)))
        barrier(world)
        share = worker_share(len(pool), rank, world)
        with torch.no_grad():
            net.eval()
            vectors = embed(net, self.photos.subset(self.train_rows[pool[share]]), normalise,
                            self.precision, self.device).cpu().numpy()  # fmt: skip
        ray.get(self.mining.add.remote(share, vectors, self.train.clusters[pool[share]]))
        barrier(world)
        # 2. negatives of the epoch's queries (mined once by the actor), 3. the global tuples
        found, _ = ray.get(
            self.mining.mine_rows.remote(np.searchsorted(pool, query_rows), conf["nnum"])
        )
        negatives = np.where(found >= 0, pool[np.maximum(found, 0)], -1)
        subset = TrainingSet(self.train.image_ids, self.train.clusters, query_rows,
                             tuple(self.train.positives[i] for i in chosen))  # fmt: skip
        tuples = epoch_tuples(subset, negatives, rng)
        per_step = conf["tuples_per_step"]
        steps = len(tuples) // per_step
        generator = None
        if conf["augment"]:
            generator = torch.Generator().manual_seed(conf["seed"] * 1000 + epoch * 16 + rank)
        loss_fn = ContrastiveLoss(margin=conf["margin"])
        model.train()
        if conf["freeze_bn"]:
            freeze_batchnorm(model)
        total = 0.0
        for step in range(steps):
            mine = tuples[step * per_step : (step + 1) * per_step][rank::world]
            optimizer.zero_grad()
            images = self.photos.subset(self.train_rows[mine.ravel()])
            out = embed(model, images, normalise, self.precision, self.device, generator)
            loss = loss_fn(out.view(*mine.shape, -1))
            (loss * world).backward()  # DDP averages: × world makes it the global batch's sum
            optimizer.step()
            total += float(loss.detach())
            report_progress(rank, epoch, step + 1, steps, total)
        return {"loss": sum_over_workers(total, world, self.device) / max(1, steps * per_step),
                "items": steps * per_step, "steps": steps}  # fmt: skip
