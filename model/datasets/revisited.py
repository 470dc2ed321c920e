"""Reading a data set in the revisited layout (cnnimageretrieval-pytorch / revisitop).

    <dir>/jpg/<name>.jpg        database and query photos
    <dir>/gnd_<name>.pkl        imlist, qimlist, gnd (a dict per query)

Two kinds of ground truth share the layout: the revisited one (``easy``/``hard``/``junk`` per
query, Easy/Medium/Hard mAP) and cirtorch's copy of the original Oxford5k/Paris6k one (``ok``/
``junk``, one mAP). Both carry the query box ``bbx`` in stored pixels, so photos of this layout
are read without EXIF rotation, as the protocol's own code reads them.

The ground truth is a pickle and may come from S3, so it is read with an unpickler that admits
only builtin containers and NumPy arrays: a pickle naming anything else is refused, never run.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model import tables
from model.datasets.sets import RetrievalSet
from model.storage import read_bytes

__all__ = ["load_ground_truth_pickle", "load_revisited"]

_SAFE_GLOBALS = frozenset(
    {
        *(
            ("builtins", name)
            for name in (
                "dict",
                "list",
                "tuple",
                "set",
                "frozenset",
                "int",
                "float",
                "complex",
                "str",
                "bytes",
                "bytearray",
                "bool",
                "slice",
            )
        ),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 carry bytes
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        *(
            (module, name)
            for package in ("numpy.core", "numpy._core")
            for module, name in (
                (f"{package}.multiarray", "_reconstruct"),
                (f"{package}.multiarray", "scalar"),
                (f"{package}.numeric", "_frombuffer"),
            )
        ),
    }
)


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Protocols 0-2 name builtins the Python 2 way (__builtin__.set); map as pickle does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: a ground-truth file may hold only builtin "
                "containers and NumPy arrays"
            )
        return super().find_class(module, name)


def load_ground_truth_pickle(data: bytes) -> Any:
    """Unpickle ``data`` admitting only builtins and NumPy arrays (no code can run)."""
    return _DataOnlyUnpickler(io.BytesIO(data)).load()


def load_revisited(dataset_dir: str | Path, name: str | None = None) -> RetrievalSet:
    """A data set in the revisited layout; ``name`` defaults to the folder's name."""
    base = Path(dataset_dir)
    name = name or base.name
    gnd_file = base / f"gnd_{name}.pkl"
    try:
        raw = load_ground_truth_pickle(read_bytes(gnd_file))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no ground-truth file {gnd_file}; expected <data-root>/{name}/gnd_{name}.pkl"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{gnd_file} is not a readable ground-truth pickle: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{gnd_file} holds a {type(raw).__name__}, expected a dict")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in raw]
    if missing:
        raise ValueError(f"{gnd_file} lacks {missing}; expected imlist, qimlist and gnd")
    if len(raw["gnd"]) != len(raw["qimlist"]):
        raise ValueError(
            f"{gnd_file}: {len(raw['gnd'])} ground-truth entries for {len(raw['qimlist'])} queries"
        )
    protocol, keys = _protocol(raw["gnd"], gnd_file)
    gnd = [
        {key: np.asarray(entry.get(key, []), dtype=np.int64).reshape(-1) for key in keys}
        for entry in raw["gnd"]
    ]
    boxes = [_box(entry.get("bbx")) for entry in raw["gnd"]]
    return RetrievalSet(
        name,
        [base / "jpg" / f"{n}.jpg" for n in raw["imlist"]],
        [base / "jpg" / f"{n}.jpg" for n in raw["qimlist"]],
        protocol=protocol,
        exif_transpose=False,
        gnd=gnd,
        query_boxes=boxes,
        db_labels=_landmark_labels(base, raw["imlist"]),
    )


def _protocol(entries: Sequence[Any], gnd_file: Path) -> tuple[str, tuple[str, ...]]:
    """``revisited`` (easy/hard/junk) or ``original`` (ok/junk), the same for every entry."""
    kinds = set()
    for j, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{gnd_file}: gnd[{j}] is a {type(entry).__name__}, expected a dict")
        if "easy" in entry or "hard" in entry:
            kinds.add("revisited")
        elif "ok" in entry:
            kinds.add("original")
        else:
            raise ValueError(
                f"{gnd_file}: gnd[{j}] has keys {sorted(entry)}; expected easy/hard/junk "
                "(revisited) or ok/junk (original Oxford5k/Paris6k)"
            )
    if len(kinds) > 1:
        raise ValueError(f"{gnd_file} mixes revisited (easy/hard) and original (ok) entries")
    protocol = kinds.pop() if kinds else "revisited"
    return protocol, ("easy", "hard", "junk") if protocol == "revisited" else ("ok", "junk")


def _box(bbx: Sequence[float] | None) -> tuple[float, float, float, float] | None:
    if bbx is None or len(bbx) == 0:
        return None
    x1, y1, x2, y2 = (float(v) for v in bbx)
    return x1, y1, x2, y2


def _landmark_labels(base: Path, imlist: Sequence[str]) -> np.ndarray | None:
    """Landmark per database image when ``base`` is a built-in collection (its cameras)."""
    manifest = tables.LANDMARKS_OUTPUT.existing(str(base))
    if manifest is None:
        return None
    table = tables.CAMERAS.read_from(manifest, ["name", "landmark"]).to_pydict()
    by_name = dict(zip(table["name"], table["landmark"], strict=True))
    return np.asarray([by_name.get(n, -1) for n in imlist], dtype=np.int64)
