"""Validation of descriptor matrices, shared by every NumPy routine that takes them."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["descriptor_matrix"]


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
