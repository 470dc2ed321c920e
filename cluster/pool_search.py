"""Brute-force inner-product search over a pool held as the shares it arrived in.

The mining actor receives an epoch's pool as one share per training worker; gathering them
into one array and copying that into a FAISS ``IndexFlat`` cost more than the search itself
(``bench/mining.py``). These searchers
read the shares where Ray put them (zero-copy NumPy views) and merge the per-share results:

- :class:`ExactSearch`: FAISS's BLAS k-NN (``faiss.knn``) on each share, exact;
- :class:`Bf16Search`: candidates from a bfloat16 product (faster than float32 on CPUs with AMX
  or AVX512-BF16), re-scored exactly in float32, so it returns the exact top
  ``k`` unless more than :data:`EXTRA` rows tie with the ``k``-th at bfloat16 precision.

Both answer ``search(x, k) -> (sims, positions)`` like a FAISS index whose rows are the pool's
positions, which is what :func:`cluster.mining.hard_negatives` asks of an index.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

__all__ = ["CANDIDATE_BYTES", "EXTRA", "SCORE_BYTES", "Bf16Search", "ExactSearch", "fast_bf16"]

EXTRA = 8
"""Candidates beyond ``k`` that the bfloat16 pass hands to the exact re-scoring."""

SCORE_BYTES = 128 << 20
"""The most a block of queries' bfloat16 scores against one share may take."""

CANDIDATE_BYTES = 16 << 20
"""The most the float32 candidates re-scored at a time may take."""


@functools.cache
def fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX tiles or AVX512-BF16);
    elsewhere PyTorch emulates it, slower than float32."""
    try:
        import torch  # lazily: the mining actor loads PyTorch only for bf16
    except ImportError:
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def _tensor(array: np.ndarray) -> Any:
    """A tensor on ``array``'s memory; Ray's zero-copy views are read-only, and never written."""
    import torch  # lazily: the mining actor loads PyTorch only for bf16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _merge(sims: list[np.ndarray], rows: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of per-share results (``[Q, k_s]`` each), best first."""
    s, r = np.concatenate(sims, axis=1), np.concatenate(rows, axis=1)
    best = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, best, axis=1), np.take_along_axis(r, best, axis=1)


class ExactSearch:
    """Exact search over ``shares`` (``(positions, vectors)`` pairs that together cover the
    positions ``0 .. size-1`` once): FAISS's BLAS k-NN per share, merged."""

    def __init__(self, shares: Sequence[tuple[np.ndarray, np.ndarray]], size: int) -> None:
        self.positions = [np.asarray(p, np.int64) for p, _ in shares]
        self.vectors = [np.ascontiguousarray(v, dtype=np.float32) for _, v in shares]
        self.d, self.ntotal = self.vectors[0].shape[1], size
        self._owner = np.empty(size, np.int64)  # position -> (share, row in it)
        self._local = np.empty(size, np.int64)
        for s, p in enumerate(self.positions):
            self._owner[p], self._local[p] = s, np.arange(len(p))
        self._start = np.cumsum([0] + [len(p) for p in self.positions[:-1]])  # (share, row) ->
        self._position = np.concatenate(self.positions)  # position: _position[_start[s] + row]

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The vectors at ``positions`` (a copy)."""
        out = np.empty((len(positions), self.d), np.float32)
        owner, local = self._owner[positions], self._local[positions]
        for s, vectors in enumerate(self.vectors):
            mine = owner == s
            out[mine] = vectors[local[mine]]
        return out

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        sims, rows = [], []
        for positions, vectors in zip(self.positions, self.vectors, strict=True):
            s, i = faiss.knn(x, vectors, min(k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
            sims.append(s)
            rows.append(np.where(i >= 0, positions[np.maximum(i, 0)], -1))
        return _merge(sims, rows, k)


class Bf16Search(ExactSearch):
    """:class:`ExactSearch`'s answer from a bfloat16 first pass and an exact float32 second."""

    def __init__(
        self,
        shares: Sequence[tuple[np.ndarray, np.ndarray]],
        size: int,
        low: Sequence[Any] | None = None,
    ) -> None:
        """``low``: the shares already in bfloat16 (:meth:`lower`), converted as they came."""
        import torch  # lazily: the mining actor loads PyTorch only for bf16

        super().__init__(shares, size)
        self._torch = torch
        self._low = list(low) if low is not None else [self.lower(v) for v in self.vectors]
        if len(self._low) != len(self.vectors):
            raise ValueError(f"{len(self._low)} bfloat16 shares for {len(self.vectors)} shares")

    @staticmethod
    def lower(vectors: np.ndarray) -> Any:
        """A share's vectors as a bfloat16 tensor."""
        import torch  # lazily: the mining actor loads PyTorch only for bf16

        return _tensor(np.ascontiguousarray(vectors, dtype=np.float32)).to(torch.bfloat16)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Block by block of queries: each block's bfloat16 scores sit in a buffer made once
        (fresh arrays of 100 MB cost more in page faults than the product), each share's top
        ``k +`` :data:`EXTRA` are merged, and the candidates re-scored exactly in float32,
        a part of the block at a time."""
        torch = self._torch
        query = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        low_query = query.to(torch.bfloat16)
        want = min(k + EXTRA, self.ntotal)
        widest = max(len(low) for low in self._low)
        block = max(1, min(len(query), SCORE_BYTES // (2 * widest)))
        scores = torch.empty(block * widest, dtype=torch.bfloat16)
        part = max(1, min(block, CANDIDATE_BYTES // (4 * want * self.d)))
        candidates = torch.empty((part * want, self.d), dtype=torch.float32)
        sims = np.empty((len(query), k), np.float32)
        rows = np.empty((len(query), k), np.int64)
        for start in range(0, len(query), block):
            stop = min(start + block, len(query))
            owner, local = self._candidates(low_query[start:stop], want, scores)
            for a in range(0, stop - start, part):
                b = min(a + part, stop - start)
                sims[start + a : start + b], rows[start + a : start + b] = self._rescore(
                    query[start + a : start + b], owner[a:b], local[a:b], k=k, candidates=candidates
                )
        return sims, rows

    def _candidates(self, low_query: Any, want: int, scores: Any) -> tuple[Any, Any]:
        """``(share, row in it)`` ``[b, want]`` of a block's best bfloat16 scores."""
        torch = self._torch
        b = len(low_query)
        top, owners, locals_ = [], [], []
        for s, low in enumerate(self._low):
            out = scores[: b * len(low)].view(b, len(low))
            torch.mm(low_query, low.T, out=out)
            v, i = torch.topk(out, min(want, len(low)), dim=1)
            top.append(v.float())
            owners.append(torch.full_like(i, s))
            locals_.append(i)
        pick = torch.topk(torch.cat(top, 1), want, dim=1).indices
        return torch.gather(torch.cat(owners, 1), 1, pick), torch.gather(
            torch.cat(locals_, 1), 1, pick
        )

    def _rescore(
        self, query: Any, owner: Any, local: Any, *, k: int, candidates: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """The exact top ``k`` of each query's candidates, in float32."""
        torch = self._torch
        b, want = owner.shape
        owner, local = owner.reshape(-1), local.reshape(-1)
        gathered = candidates[: b * want]
        for s, vectors in enumerate(self.vectors):
            mine = torch.nonzero(owner == s).squeeze(1)
            gathered.index_copy_(0, mine, _tensor(vectors).index_select(0, local[mine]))
        exact = torch.bmm(gathered.view(b, want, self.d), query.unsqueeze(2)).squeeze(2)
        positions = self._position[self._start[owner.numpy()] + local.numpy()]
        return _merge([exact.numpy()], [positions.reshape(b, want)], k)
