"""Group L2-normalised global descriptors into candidate scenes, and score groupings (NumPy only).

This is the maths of the ``group`` stage: photos that arrive without a ``scene`` column are split
into groups that Structure-from-Motion then reconstructs one at a time. Both kinds of error cost
something there: a group that mixes scenes wastes matching time and can register a wrong view
(purity), while a scene split across groups loses the views that would have completed its model
(recall). :func:`cluster_scores` measures both against known scenes.

Method (:func:`group_descriptors`): connected components of the **mutual** k-nearest-neighbour
graph, keeping only edges whose cosine similarity reaches a threshold; an image that this leaves
alone then joins, as a leaf, the group of its best neighbour above the threshold.

- Mutual kNN (an edge only when each image is among the other's ``k`` nearest) resists
  *chaining*, the failure of single linkage where a thin trail of in-between images, each close
  to the next, glues two scenes together: inside a scene the images are denser than along a
  trail, so a trail image is not among a scene image's nearest neighbours and the link is not
  mutual. It also removes "hub" images (blurry, dark, generic) that are everyone's neighbour but
  whose own neighbours lie elsewhere.
- The threshold stops two scenes that happen to be each other's nearest (a scene with fewer than
  ``k`` photos always has outside neighbours) from joining on a weak similarity.
- The leaf step repairs mutual kNN's known loss: in high dimensions some images ("anti-hubs")
  are in nobody's top ``k`` although their own neighbours are all in one scene. A leaf joins one
  group and takes nothing with it, so it cannot chain two groups together.
- Components, not a linkage criterion, keep recall: a scene captured all round (a ring of views)
  is a long, thin manifold whose far ends are dissimilar; average linkage cuts it, while a chain
  of mutual, strong edges keeps it whole. On the shared real photos, average linkage restricted
  to the same graph was never better and lost recall from threshold 0.7 up (0.94 against 0.97 at
  0.75), and dense average linkage (O(N²) memory) kept both figures >= 0.9 over a narrower range.
- Cost: one kNN search, then O(N·k) memory and O(N·k log(N·k)) time for the graph and the
  components (vectorised union–find: hooking plus pointer jumping). The kNN search here is a
  blocked exact inner-product top-k (``model.retrieval.rank_by_similarity``); a FAISS index can
  supply the neighbours instead (``neighbours=(sims, idx)``, as ``index.search`` returns them).

Defaults. The threshold is a cosine similarity, so it belongs to a descriptor: 0.75 is for the
project's default off-the-shelf descriptor (ImageNet EfficientNet-Lite0 + GeM, unwhitened), where
unrelated photos still score about 0.45 because post-ReLU activations are all positive. It sits
between two figures that need no labels: the 90th percentile of all pair similarities (0.64 on
the shared photos; in a collection of many scenes nearly all pairs are unrelated) and the median
similarity of an image to its 10th nearest neighbour (0.80). ``k = 10`` is large enough that a
scene's members link up (``k = 5`` fragments scenes into small mutual cliques) and small enough to
keep the graph O(N·k). On the shared photos purity and recall both stay >= 0.9 for thresholds
0.68 to 0.80 at ``k = 10``, and for ``k`` from 7 to 30 at 0.75. Whitened or fine-tuned
descriptors spread unrelated photos towards 0 and want their own threshold.
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import ArrayLike, NDArray

from model.arrays import descriptor_matrix
from model.retrieval import rank_by_similarity

__all__ = [
    "DEFAULT_K",
    "DEFAULT_THRESHOLD",
    "cluster_scores",
    "connected_components",
    "group_descriptors",
    "knn_neighbours",
    "relabel_by_size",
]

logger = logging.getLogger(__name__)

DEFAULT_K = 10
# Cosine similarity for the default unwhitened ImageNet GeM descriptor; see the module docstring.
DEFAULT_THRESHOLD = 0.75
# Neighbour descriptors gathered at once to score the kNN lists: 16 Mi floats.
_GATHER_BLOCK_ELEMS = 1 << 24


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_descriptors(X: ArrayLike) -> NDArray[np.floating]:
    """``X`` as a finite 2-D float array (float32 stays float32), or a ValueError saying why not."""
    arr = descriptor_matrix(X)
    if arr.size:
        off = np.abs(np.linalg.norm(arr, axis=1) - 1.0) > 1e-3
        if off.any():
            logger.warning(
                "group_descriptors expects L2-normalised rows (the threshold is a cosine "
                "similarity); %d of %d row(s) have norm off 1 by more than 1e-3",
                int(off.sum()),
                arr.shape[0],
            )
    return arr


def knn_neighbours(
    X: ArrayLike, k: int = DEFAULT_K
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Each row's ``k`` nearest other rows by inner product: ``(sims, idx)``, both ``[N, k']``.

    ``k' = min(k, N - 1)``; columns go by decreasing similarity, equal scores lower index first,
    and a row never lists itself (even when it has exact duplicates). This is the layout
    ``faiss.Index.search`` returns, so either can feed ``group_descriptors``. The search is exact
    and blocked (bounded score memory); past ~10⁵ images a FAISS index should take over.
    """
    return _knn(_check_descriptors(X), _check_int("k", k, 1))


def _knn(arr: NDArray[np.floating], k: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    n = arr.shape[0]
    k_eff = min(k, max(n - 1, 0))
    if k_eff == 0:
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    # One extra column so that dropping the row itself still leaves k; when more than k + 1 rows
    # tie with it the row may be absent, and the last column goes instead.
    ranked = rank_by_similarity(arr, arr, topk=k_eff + 1)
    is_self = ranked == np.arange(n)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k_eff)
    keep = np.ones(ranked.shape, dtype=bool)
    keep[np.arange(n), drop] = False
    idx = ranked[keep].reshape(n, k_eff)
    sims = np.empty((n, k_eff), np.float32)
    step = max(1, _GATHER_BLOCK_ELEMS // (k_eff * max(arr.shape[1], 1)))
    for start in range(0, n, step):
        block = slice(start, start + step)
        sims[block] = np.einsum("nd,nkd->nk", arr[block], arr[idx[block]])
    return sims, idx


def _check_neighbours(
    neighbours: tuple[ArrayLike, ArrayLike], n: int | None
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Validated ``(sims, idx)``; ``n`` is the expected row count when X is given too."""
    if not isinstance(neighbours, (tuple, list)) or len(neighbours) != 2:
        raise ValueError("neighbours must be a pair (sims, idx) as faiss.Index.search returns")
    sims, idx = np.asarray(neighbours[0]), np.asarray(neighbours[1])
    if sims.ndim != 2 or idx.ndim != 2 or sims.shape != idx.shape:
        raise ValueError(
            f"neighbours sims and idx must be 2-D of the same shape [N, k], "
            f"got {sims.shape} and {idx.shape}"
        )
    if n is not None and sims.shape[0] != n:
        raise ValueError(f"neighbours have {sims.shape[0]} rows but X has {n}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"neighbour idx must be integers, got dtype {idx.dtype}")
    if not (np.issubdtype(sims.dtype, np.floating) or np.issubdtype(sims.dtype, np.integer)):
        raise ValueError(f"neighbour sims must be real numbers, got dtype {sims.dtype}")
    rows = sims.shape[0]
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < -1 or idx.max() >= rows):
        raise ValueError(
            f"neighbour idx must lie in [0, {rows}) or be -1 (no neighbour), "
            f"got values in [{idx.min()}, {idx.max()}]"
        )
    sims = sims.astype(np.float64, copy=False)
    bad = (idx >= 0) & ~np.isfinite(sims)
    if bad.any():
        raise ValueError(
            f"neighbour sims have {int(bad.sum())} NaN or inf value(s) "
            f"(first in row {int(np.flatnonzero(bad.any(axis=1))[0])})"
        )
    return sims, idx


def _directed_edges(
    sims: NDArray[np.float64], idx: NDArray[np.int64], k: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    """The kNN graph as directed edges ``i -> j`` over each row's ``k`` best valid neighbours.

    Self links and -1 padding (FAISS's "no neighbour") are dropped, and a neighbour listed twice
    in a row (lists merged from overlapping shards) counts once, at its best similarity, so that
    it cannot pass for a mutual edge. Rows are re-sorted by decreasing similarity (stable), so
    merged lists need not arrive sorted.
    """
    n, m = idx.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), m).reshape(n, m)
    valid = (idx >= 0) & (idx != rows)
    order = np.argsort(-np.where(valid, sims, -np.inf), axis=1, kind="stable")
    idx, sims, valid = (np.take_along_axis(a, order, axis=1) for a in (idx, sims, valid))
    # First listing (the best, rows being sorted) of each distinct (row, neighbour) pair.
    first = np.zeros(n * m, dtype=bool)
    first[np.unique(np.where(valid, rows * n + idx, -1).ravel(), return_index=True)[1]] = True
    valid &= first.reshape(n, m)
    order = np.argsort(~valid, axis=1, kind="stable")  # valid entries first, order kept
    idx, sims, valid = (np.take_along_axis(a, order, axis=1)[:, :k] for a in (idx, sims, valid))
    return rows[:, :k][valid], idx[valid], sims[valid]


def _undirected_edges(
    src: NDArray[np.int64],
    dst: NDArray[np.int64],
    sim: NDArray[np.float64],
    *,
    n: int,
    mutual: bool,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    """Undirected edges ``(a < b)``: those listed both ways when ``mutual``, else either way.

    An edge listed both ways takes the lower of its two similarities (they agree for an exact
    search; an approximate one may differ, and the cautious value guards purity).
    """
    a, b = np.minimum(src, dst), np.maximum(src, dst)
    key = a * n + b
    order = np.argsort(key, kind="stable")
    key, sim = key[order], sim[order]
    uniq, start, count = np.unique(key, return_index=True, return_counts=True)
    low = np.minimum.reduceat(sim, start) if key.size else sim
    if mutual:
        both = count >= 2
        uniq, low = uniq[both], low[both]
    return uniq // n, uniq % n, low


def connected_components(n: int, a: ArrayLike, b: ArrayLike) -> NDArray[np.int64]:
    """Root (smallest member) of each of ``n`` nodes' component under undirected edges ``a–b``.

    Vectorised union–find: every round hooks each edge's larger root under its smaller one, then
    pointer jumping flattens the trees to stars. A root only ever points to a smaller index, so
    no cycle can form, and each round with a cross edge removes at least one root.
    """
    n = _check_int("n", n, 0)
    ea = np.asarray(a, dtype=np.int64).ravel()
    eb = np.asarray(b, dtype=np.int64).ravel()
    if ea.shape != eb.shape:
        raise ValueError(f"edge endpoint arrays differ in length: {ea.shape} vs {eb.shape}")
    if ea.size and (min(ea.min(), eb.min()) < 0 or max(ea.max(), eb.max()) >= n):
        raise ValueError(f"edge endpoints must lie in [0, {n})")
    parent = np.arange(n, dtype=np.int64)
    while ea.size:
        ra, rb = parent[ea], parent[eb]
        cross = ra != rb
        if not cross.any():
            break
        ea, eb, ra, rb = ea[cross], eb[cross], ra[cross], rb[cross]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            hop = parent[parent]
            if np.array_equal(hop, parent):
                break
            parent = hop
    return parent


def _attach_isolated(
    root: NDArray[np.int64],
    src: NDArray[np.int64],
    dst: NDArray[np.int64],
    *,
    sim: NDArray[np.float64],
    threshold: float,
) -> NDArray[np.int64]:
    """Join each image left alone by the mutual graph to the group of its best strong neighbour.

    In high dimensions some images ("anti-hubs") are among nobody's k nearest although their own
    nearest lie well inside a scene, so mutual kNN strands them. Each such image joins the group
    of its most similar listed neighbour that has a group of two or more, if that similarity
    reaches the threshold. It joins as a leaf: nothing attaches to it in turn and no two groups
    merge, so this cannot chain. ``src -> dst`` edges arrive row by row, best first.
    """
    alone = np.bincount(root, minlength=root.size)[root] == 1
    take = alone[src] & ~alone[dst] & (sim >= threshold)
    rows, first = np.unique(src[take], return_index=True)
    root = root.copy()
    root[rows] = root[dst[take][first]]
    return root


def _relabel(root: NDArray[np.int64], min_size: int) -> NDArray[np.int64]:
    """Group ids 0..G-1 by size descending, ties by first member; groups under min_size -> -1."""
    if root.size == 0:
        return root.astype(np.int64)
    _, first, inverse, counts = np.unique(
        root, return_index=True, return_inverse=True, return_counts=True
    )
    order = np.lexsort((first, -counts))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    labels = rank[inverse].astype(np.int64)
    n_kept = int((counts >= min_size).sum())
    labels[labels >= n_kept] = -1
    return labels


def relabel_by_size(labels: ArrayLike, min_size: int = 1) -> NDArray[np.int64]:
    """Group ids ``0..G-1`` by size (largest first, ties by first member); groups under
    ``min_size`` and negative labels (unassigned) become ``-1``."""
    arr = np.asarray(labels, dtype=np.int64)
    out = np.full(arr.shape, -1, np.int64)
    kept = arr >= 0
    if kept.any():
        out[kept] = _relabel(arr[kept], _check_int("min_size", min_size, 1))
    return out


def group_descriptors(
    X: ArrayLike | None = None,
    *,
    k: int = DEFAULT_K,
    threshold: float = DEFAULT_THRESHOLD,
    min_size: int = 1,
    mutual: bool = True,
    neighbours: tuple[ArrayLike, ArrayLike] | None = None,
) -> NDArray[np.int64]:
    """A group id per image: components of the mutual kNN graph at similarity >= ``threshold``.

    ``X`` is ``[N, D]`` L2-normalised descriptors, or ``None`` when ``neighbours=(sims, idx)``
    (each ``[N, m]``, e.g. ``faiss.Index.search(X, k + 1)``) already hold the kNN search; a row
    listing itself or ``-1`` in ``idx`` is fine, and only each row's ``k`` most similar valid
    neighbours are used, so results match an exact search of ``X``. See the module docstring for
    why mutual kNN with a threshold, and why 0.75.

    Returns int64 ids ``0..G-1``, ordered by group size (largest first), ties by the lowest row
    index. A photo with no mutual edge at ``threshold`` or above joins the group of its best
    neighbour at or above it that lies in a group of two or more, else stays a group of its own.
    Groups with fewer than ``min_size`` photos (SfM needs a few views) get ``-1`` instead, so
    they stay visible and counted rather than dropped. ``mutual=False`` keeps edges listed either
    way (single linkage over the kNN graph): no protection against chaining. The result depends
    only on the input, never on thread count or a random seed.
    """
    k = _check_int("k", k, 1)
    min_size = _check_int("min_size", min_size, 1)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)):
        raise ValueError(f"threshold must be a number in [-1, 1], got {threshold!r}")
    threshold = float(threshold)
    if not -1.0 <= threshold <= 1.0:  # also rejects NaN
        raise ValueError(
            f"threshold is a cosine similarity and must lie in [-1, 1], got {threshold!r}"
        )
    if neighbours is None:
        if X is None:
            raise ValueError("give descriptors X or precomputed neighbours=(sims, idx)")
        knn_sims, idx = _knn(_check_descriptors(X), k)
        sims = knn_sims.astype(np.float64)
    else:
        n_rows = None if X is None else _check_descriptors(X).shape[0]
        sims, idx = _check_neighbours(neighbours, n_rows)
    n = idx.shape[0]

    src, dst, dsim = _directed_edges(sims, idx, k)
    a, b, sim = _undirected_edges(src, dst, dsim, n=n, mutual=mutual)
    strong = sim >= threshold
    root = _attach_isolated(
        connected_components(n, a[strong], b[strong]), src, dst, sim=dsim, threshold=threshold
    )
    labels = _relabel(root, min_size)
    logger.info(
        "grouped %d images into %d groups (%d singletons, %d unassigned below min_size=%d) "
        "from %d of %d %s kNN edges at similarity >= %.3f, k=%d",
        n,
        int(labels.max()) + 1 if n else 0,
        int((np.bincount(labels[labels >= 0]) == 1).sum()) if n else 0,
        int((labels < 0).sum()),
        min_size,
        int(strong.sum()),
        a.size,
        "mutual" if mutual else "symmetrised",
        threshold,
        k,
    )
    return labels


def _codes(name: str, labels: ArrayLike) -> NDArray[np.int64]:
    """Labels of any type as codes ``0..L-1``, or a ValueError saying why they cannot be."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (a label per image), got shape {arr.shape}")
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        raise ValueError(f"{name} has NaN or inf labels")
    return np.unique(arr, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _pairs(counts: NDArray[np.int64]) -> int:
    """Unordered pairs inside groups of these sizes."""
    return int((counts * (counts - 1) // 2).sum())


def cluster_scores(pred: ArrayLike, truth: ArrayLike) -> dict[str, float | int]:
    """How well groups ``pred`` match true scenes ``truth`` (a label each, same length).

    - ``purity``: the share of images whose group's most common scene is their own scene,
      ``Σ_groups max_scene |g ∩ s| / N``. 1 when no group mixes scenes; all singletons score 1.
    - ``recall`` (inverse purity): the share of images that lie in the group holding the largest
      part of their scene, ``Σ_scenes max_group |g ∩ s| / N``. 1 when no scene is split; all in
      one group scores 1.
    - ``pair_precision``: of the image pairs put in one group, the share from one scene;
      ``pair_recall``: of the pairs from one scene, the share put in one group. With no pairs to
      judge (all singletons; or every scene a single photo) the figure is 1: no wrong claim made,
      none missed. Pairs weigh big groups quadratically; purity and recall weigh every image once.
    - ``n_groups`` (an unassigned image counts as a group), ``n_scenes``, ``n_images``,
      ``n_unassigned``.

    A negative numeric ``pred`` label (``-1``: unassigned, see ``group_descriptors``) is a group
    of its own per image: it mixes nothing but splits its scene. Labels may be of any type.
    """
    p = _codes("pred", pred)
    t = _codes("truth", truth)
    if p.shape != t.shape:
        raise ValueError(f"pred and truth differ in length: {p.size} vs {t.size}")
    n = p.size
    if n == 0:
        raise ValueError("pred and truth are empty: nothing to score")
    raw = np.asarray(pred)
    unassigned = raw < 0 if raw.dtype.kind in "iuf" else np.zeros(n, dtype=bool)
    n_unassigned = int(unassigned.sum())
    if n_unassigned:
        p = p.copy()
        p[unassigned] = p.max() + 1 + np.arange(n_unassigned)
        p = np.unique(p, return_inverse=True)[1].reshape(-1).astype(np.int64)
    n_groups, n_scenes = int(p.max()) + 1, int(t.max()) + 1
    # Sparse contingency table: the non-zero cells |g ∩ s| only, O(N) memory.
    cell, cell_count = np.unique(p * n_scenes + t, return_counts=True)
    g, s = cell // n_scenes, cell % n_scenes
    group_best = np.zeros(n_groups, np.int64)
    scene_best = np.zeros(n_scenes, np.int64)
    np.maximum.at(group_best, g, cell_count)
    np.maximum.at(scene_best, s, cell_count)
    together = _pairs(cell_count)
    grouped_pairs = _pairs(np.bincount(p))
    scene_pairs = _pairs(np.bincount(t))
    return {
        "purity": float(group_best.sum() / n),
        "recall": float(scene_best.sum() / n),
        "pair_precision": together / grouped_pairs if grouped_pairs else 1.0,
        "pair_recall": together / scene_pairs if scene_pairs else 1.0,
        "n_groups": n_groups,
        "n_scenes": n_scenes,
        "n_images": n,
        "n_unassigned": n_unassigned,
    }
