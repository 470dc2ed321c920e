"""Writing results: JSON that understands NumPy, published whole through the storage layer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from model import storage

__all__ = ["to_json", "write_json"]


def to_json(payload: Any) -> str:
    """``payload`` as indented JSON; NumPy scalars and arrays and paths become plain values."""
    return json.dumps(payload, indent=2, default=_jsonable)


def write_json(uri: str | os.PathLike[str], payload: Any) -> str:
    """Write ``payload`` as JSON to a path or ``s3://`` URI; a reader never sees half a file."""
    return storage.write_text(uri, to_json(payload))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
