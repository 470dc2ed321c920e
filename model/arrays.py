"""Validation of descriptor matrices, shared by every NumPy routine that takes them."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["descriptor_matrix", "index_array"]


def descriptor_matrix(X: ArrayLike, name: str = "X", dtype: Any = None) -> NDArray[np.floating]:
    """``X`` as a 2-D real array with finite rows, or a ``ValueError`` saying what is wrong.

    ``dtype=None`` keeps float32 as float32 (large matrices are not copied to float64) and
    turns integers into float; a routine that needs float64 for stability asks for it.
    """
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D [N, D] (a row per descriptor), got shape {arr.shape}; "
            "reshape a single descriptor with x[None, :]"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(dtype or np.result_type(arr.dtype, np.float32), copy=False)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} of {arr.shape[0]} row(s) with NaN or inf "
            f"(first at row {int(np.flatnonzero(bad)[0])}); drop or re-extract them first"
        )
    return arr


def index_array(value: ArrayLike, n: int, name: str) -> NDArray[np.int64]:
    """``value`` as 1-D int64 indices in ``[0, n)``, or a ``ValueError`` naming ``name``."""
    arr = np.asarray(value)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name} must be a 1-D list of integer indices, got shape {arr.shape}, "
            f"dtype {arr.dtype}"
        )
    if arr.min() < 0 or arr.max() >= n:
        raise ValueError(
            f"{name} has indices outside [0, {n}): min {arr.min()}, max {arr.max()}; "
            "they must lie in that range"
        )
    return arr.astype(np.int64, copy=False)
