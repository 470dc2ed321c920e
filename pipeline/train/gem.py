"""GeM mode, one worker's side: hard negatives mined from the whole pool, contrastive tuples.

Each epoch, as the GeM paper does but over the whole pool instead of a random few thousand:

1. the photos are described once with the current network, every worker its share, into the
   mining-index actor (``cluster.mining``): the epoch's negative pool (the training clusters'
   photos, or a seeded sample of ``pool_size`` of them that holds the epoch's queries) and the
   held-out photos. The previous epoch's validation did it (the network has not changed since),
   so only the first epoch of a resumed run describes at its start;
2. the actor mines ``nnum`` hard negatives (nearest of other clusters, one per cluster, never
   a held-out one) for the epoch's queries once, from the descriptors it holds, and every
   worker takes the same answer;
3. the epoch's tuples (query, a random positive, its negatives) come from one seeded draw shared
   by all workers: every optimizer step trains on the same global batch of ``tuples_per_step``
   tuples whatever the number of workers, each worker computing every ``world``-th of them. The
   contrastive loss is a sum over tuples and DDP averages gradients, so each worker scales its
   share's loss by ``world``: the step's gradient is the global batch's, exactly;
4. validation: the workers describe the next epoch's photos (step 1 of the next epoch) and rank
   0 scores the held-out clusters from the actor's vectors: mAP of each held-out query against
   every described photo, its own cluster's photos positive (every positive counts, as in the
   revisited protocol's Medium setup; there are no junk labels), without and with the Lw
   learned from the training clusters' whitening pairs at the same resolution. No worker
   describes the collection alone.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import ray
import torch

from model.evaluation import cluster_map
from model.losses import ContrastiveLoss
from model.training_set import TrainingSet, split_clusters
from model.whitening_fit import LW_META, whitening_on_held_out
from pipeline.train.collective import barrier, report_progress, sum_over_workers
from pipeline.train.conf import TrainConf
from pipeline.train.images import decode_photos, embed, freeze_batchnorm, mean_std
from pipeline.train.tuples import epoch_tuples, worker_share

__all__ = ["GemEpochs"]


class GemEpochs:
    """Validation and epochs of the GeM mode for one worker (``rank`` of ``world``)."""

    score = "val_map"

    def __init__(
        self,
        conf: TrainConf,
        data: dict[str, Any],
        precision: Any,
        *,
        device: Any,
        rank: int,
        world: int,
    ) -> None:
        self.conf, self.precision, self.device = conf, precision, device
        self.rank, self.world = rank, world
        self.mining = data["mining"]
        pool: TrainingSet = data["training_set"]
        self.pool, self.clusters = pool, pool.clusters
        self.train, self.val = split_clusters(pool, conf.held_out, conf.seed)
        ids = pool.image_ids.tolist()
        self.photos = decode_photos(conf.images, ids, conf.image_size)
        row_of = {image_id: i for i, image_id in enumerate(ids)}
        self.train_rows = np.array([row_of[i] for i in self.train.image_ids], np.int64)
        self.val_rows = np.array([row_of[i] for i in self.val.image_ids], np.int64)
        self.val_queries = self.val_rows[self.val.queries]
        # validation ranks the held-out photos among every training photo (or a fixed sample
        # of --pool-size of them), at --val-size: the size extract will describe at
        fixed = self._sample(np.random.default_rng(conf.seed))
        self.val_set = np.union1d(self.val_rows, self.train_rows[fixed])
        self.validation = data.get("validation")  # an actor when val_size is its own size
        if self.validation is not None:  # each worker holds its share at that size
            mine = self.val_set[worker_share(len(self.val_set), rank, world)]
            self.val_photos = decode_photos(
                conf.images, [ids[r] for r in mine], conf.gem.val_size, lossless=True
            )
        # Lw sees the training clusters only: their pairs, and their photos as the scatter C_D
        trained = set(self.train.image_ids.tolist())
        self.lw_pairs = [
            (q, p) for q, p in data["whitening_pairs"] if q in trained and p in trained
        ]
        self.described: tuple[int, np.ndarray] | None = None
        """``(epoch, pool rows)``: the photos the actor holds, described for that epoch."""
        self.held_rows = np.zeros(0, np.int64)
        """The pool rows the mining actor holds, in its position order."""
        self.lw: tuple[np.ndarray, np.ndarray, dict] | None = None
        """Rank 0: ``(m, P, how)`` of the Lw the last validation learned."""

    def _sample(self, rng: np.random.Generator, keep: np.ndarray | None = None) -> np.ndarray:
        """Training rows (sorted): every one, or ``pool_size`` of them drawn by ``rng``, the
        rows of ``keep`` always among them."""
        everyone = np.arange(len(self.train_rows))
        size = self.conf.gem.pool_size
        if not size or size >= len(everyone):
            return everyone
        keep = np.unique(keep) if keep is not None else np.zeros(0, np.int64)
        others = np.setdiff1d(everyone, keep)
        extra = rng.choice(others, min(len(others), max(0, size - len(keep))), replace=False)
        return np.sort(np.concatenate([keep, extra]))

    def _draw(self, epoch: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
        """``(rng, chosen, negative pool)`` of ``epoch``: the same on every worker, whenever
        drawn. ``chosen`` indexes the training queries; the pool holds training rows: every
        one, or ``pool_size`` of them with the epoch's queries among them (sorted)."""
        rng = np.random.default_rng(self.conf.seed * 1000 + epoch)
        chosen = np.sort(rng.permutation(len(self.train.queries))[: self.conf.gem.queries])
        return rng, chosen, self._sample(rng, keep=self.train.queries[chosen])

    def _describe_into(
        self, net: Any, actor: Any, epoch: int, *, rows: np.ndarray, photos: Any, size: int
    ) -> None:
        """Every worker describes ``photos``, its share of ``rows`` at longest side ``size``,
        into ``actor``; forward passes hold as many pixels as the training size's do."""
        if self.rank == 0:
            ray.get(actor.reset.remote(epoch, len(rows)))
        barrier(self.world)
        share = worker_share(len(rows), self.rank, self.world)
        scale = (self.conf.image_size / size) ** 2
        precision = replace(
            self.precision, batch_size=max(1, int(self.precision.batch_size * scale))
        )
        with torch.no_grad():
            net.eval()
            vectors = (
                embed(
                    net, photos, mean_std(net, self.device), precision=precision, device=self.device
                )
                .cpu()
                .numpy()
            )
        ray.get(actor.add.remote(share, vectors, self.clusters[rows[share]]))
        barrier(self.world)

    def describe(self, net: Any, epoch: int, pool: bool = True) -> None:
        """Every worker describes its share of ``epoch``'s photos at training size with
        ``net`` as it stands, into the mining actor: the epoch's negative pool (unless
        ``pool`` is false), and the validation set when validation is at training size
        (described once for both)."""
        rows = self.train_rows[self._draw(epoch)[2]] if pool else np.zeros(0, np.int64)
        if self.validation is None:
            rows = np.union1d(rows, self.val_set)
        share = worker_share(len(rows), self.rank, self.world)
        self._describe_into(
            net,
            self.mining,
            epoch,
            rows=rows,
            photos=self.photos.subset(rows[share]),
            size=self.conf.image_size,
        )
        self.held_rows = rows
        self.described = (epoch, rows) if pool else None

    def validate(self, net: Any, next_epoch: int | None) -> dict[str, float]:
        """Held-out queries against the validation set (every training photo, or a fixed
        sample), plain and with the Lw learned from the training clusters, at ``val_size``:
        the training stage's final Lw step, on this network's vectors. Every worker describes
        ``next_epoch``'s pool (so :meth:`epoch` mines without describing again; None: there is
        none) and its share of the validation set (the same description at training size);
        rank 0 scores."""
        if self.validation is None or next_epoch is not None:
            self.describe(net, next_epoch or 0, pool=next_epoch is not None)
        if self.validation is not None:
            self._describe_into(
                net,
                self.validation,
                next_epoch or 0,
                rows=self.val_set,
                photos=self.val_photos,
                size=self.conf.gem.val_size,
            )
        if self.rank != 0:
            return {}
        if self.validation is not None:
            vectors = ray.get(self.validation.vectors.remote())
        else:
            vectors = ray.get(self.mining.vectors.remote())
            vectors = vectors[np.searchsorted(self.held_rows, self.val_set)]
        rows = self.val_set
        clusters = self.clusters[rows]
        queries = np.searchsorted(rows, self.val_queries)
        ids = self.pool.image_ids[rows]
        held = set(ids.tolist())
        pairs = [(q, p) for q, p in self.lw_pairs if q in held and p in held]
        models = None if self.pool.models is None else self.pool.models[rows]
        self.lw = None
        if len(pairs) < self.conf.lw.fit.min_pairs:  # no figure rather than a noisy one
            return {"val_map": cluster_map(vectors, clusters, queries, models=models)}
        m, P, how = whitening_on_held_out(
            ids,
            vectors,
            clusters,
            trained=np.isin(rows, self.train_rows),
            queries=queries,
            pairs=pairs,
            fit=self.conf.lw.fit,
            models=models,
        )
        self.lw = (m, P, how)
        return {"val_map": how["val_map"], "val_map_lw": how["val_map_lw"]}

    def checkpoint_whitening(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
        """Rank 0: ``(m, P, how)`` of the Lw the last validation learned, to save with the
        epoch's weights, when it was learned at --whiten-size (the training stage's final Lw
        then takes it)."""
        if self.lw is None or self.conf.gem.val_size != self.conf.lw.whiten_size:
            return None
        m, P, how = self.lw
        return m, P, {k: v for k, v in how.items() if k in LW_META}

    def epoch(self, model: Any, net: Any, optimizer: Any, *, epoch: int) -> dict[str, float]:
        """One epoch; returns its ``loss`` (per tuple), ``items`` (tuples) and ``steps``."""
        conf, rank, world = self.conf, self.rank, self.world
        rng, chosen, pool = self._draw(epoch)
        # 1. the negative pool, each worker its share (unless validation just described it)
        if self.described is None or self.described[0] != epoch:
            self.describe(net, epoch)
        _, rows = self.described
        # 2. negatives of the epoch's queries (mined once by the actor), 3. the global tuples
        query_rows = self.train.queries[chosen]
        allowed = np.isin(rows, self.train_rows[pool])  # never a held-out scene
        query_positions = np.searchsorted(rows, self.train_rows[query_rows])
        found, _ = ray.get(self.mining.mine_rows.remote(query_positions, conf.gem.nnum, allowed))
        negatives = np.where(found >= 0, np.searchsorted(self.train_rows, rows[found]), -1)
        subset = TrainingSet(
            self.train.image_ids,
            self.train.clusters,
            query_rows,
            tuple(self.train.positives[i] for i in chosen),
        )
        tuples = epoch_tuples(subset, negatives, rng)
        per_step = conf.gem.tuples_per_step
        steps = len(tuples) // per_step
        generator = None
        if conf.augment:
            generator = torch.Generator().manual_seed(conf.seed * 1000 + epoch * 16 + rank)
        normalise = mean_std(net, self.device)
        loss_fn = ContrastiveLoss(margin=conf.margin)
        model.train()
        if conf.freeze_bn:
            freeze_batchnorm(model)
        total, started = 0.0, time.perf_counter()
        for step in range(steps):
            mine = tuples[step * per_step : (step + 1) * per_step][rank::world]
            optimizer.zero_grad()
            images = self.photos.subset(self.train_rows[mine.ravel()])
            out = embed(
                model,
                images,
                normalise,
                precision=self.precision,
                device=self.device,
                generator=generator,
            )
            loss = loss_fn(out.view(*mine.shape, -1))
            (loss * world).backward()  # DDP averages: × world makes it the global batch's sum
            optimizer.step()
            total += float(loss.detach())
            report_progress(rank, epoch, step + 1, steps=steps, loss_sum=total)
        steps_seconds = time.perf_counter() - started
        return {
            "loss": sum_over_workers(total, world, self.device) / max(1, steps * per_step),
            "items": steps * per_step,
            "steps": steps,
            "steps_seconds": steps_seconds,
        }
