"""Photo sets to evaluate retrieval on, each with what counts as a right answer.

Three kinds, one type (``RetrievalSet``):
- the revisited layout of cnnimageretrieval-pytorch / revisitop (``<dir>/jpg/<name>.jpg`` and
  ``<dir>/gnd_<name>.pkl``): ROxford, RParis and the built-in landmark collection;
- a folder with a sub-folder per scene: every photo is a query, the other photos of its scene
  are its positives (the photo itself is junk);
- a flat folder: every photo is a query with no ground truth (results without mAP).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.uri import read_bytes

__all__ = [
    "IMAGE_SUFFIXES",
    "RetrievalSet",
    "list_images",
    "load_folder",
    "load_revisited",
    "present_subset",
    "same_label_pairs",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class RetrievalSet:
    """A database, queries (optionally cropped) and, when known, each query's ground truth.

    ``protocol`` is ``"revisited"`` (gnd entries with ``easy``/``hard``/``junk``), ``"scenes"``
    (entries with ``ok``/``junk``) or ``"none"``. ``db_labels`` gives a scene or landmark per
    database image where known (-1 for distractors), which whitening uses for its pairs.
    """

    name: str
    db_paths: list[Path]
    query_paths: list[Path]
    protocol: str
    gnd: list[dict[str, np.ndarray]] | None = None
    query_boxes: list[tuple[float, float, float, float] | None] = field(default_factory=list)
    db_labels: np.ndarray | None = None
    label_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.query_boxes:
            self.query_boxes = [None] * len(self.query_paths)
        if self.gnd is not None and len(self.gnd) != len(self.query_paths):
            raise ValueError(f"{len(self.gnd)} ground-truth entries for {len(self.query_paths)}")

    @property
    def queries_are_database(self) -> bool:
        """Scene folders query with their own database photos."""
        return self.protocol in ("scenes", "none")


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_folder(root: str | Path) -> RetrievalSet:
    """A folder of photos: one sub-folder per scene gives ground truth; a flat folder has none."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no photo folder at {root}")
    scenes = sorted(d for d in root.iterdir() if d.is_dir() and list_images(d))
    if not scenes:
        paths = list_images(root)
        if not paths:
            raise ValueError(f"{root} holds no photos ({', '.join(IMAGE_SUFFIXES)})")
        return RetrievalSet(root.name, paths, paths, protocol="none")
    loose = list_images(root)
    if loose:
        logger.warning("ignoring %d photos beside the scene folders in %s", len(loose), root)
    paths, labels = [], []
    for label, scene in enumerate(scenes):
        images = list_images(scene)
        paths += images
        labels += [label] * len(images)
    labels_arr = np.asarray(labels)
    gnd = []
    for j, label in enumerate(labels_arr):
        same = np.flatnonzero(labels_arr == label)
        gnd.append({"ok": same[same != j], "junk": np.array([j])})
    return RetrievalSet(
        root.name,
        paths,
        paths,
        protocol="scenes",
        gnd=gnd,
        db_labels=labels_arr,
        label_names=[s.name for s in scenes],
    )


def load_revisited(dataset_dir: str | Path, name: str | None = None) -> RetrievalSet:
    """A data set in the revisited layout; ``name`` defaults to the folder's name."""
    base = Path(dataset_dir)
    name = name or base.name
    gnd_file = base / f"gnd_{name}.pkl"
    try:
        raw = pickle.loads(read_bytes(gnd_file))
    except FileNotFoundError:
        raise FileNotFoundError(f"no ground-truth file {gnd_file}") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{gnd_file} is not a readable ground-truth pickle: {err}") from err
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in raw]
    if missing:
        raise ValueError(f"{gnd_file} lacks {missing}; expected imlist, qimlist and gnd")
    gnd = [
        {key: np.asarray(entry.get(key, []), dtype=np.int64) for key in ("easy", "hard", "junk")}
        for entry in raw["gnd"]
    ]
    boxes = [_box(entry.get("bbx")) for entry in raw["gnd"]]
    labels = _landmark_labels(base, raw["imlist"])
    return RetrievalSet(
        name,
        [base / "jpg" / f"{n}.jpg" for n in raw["imlist"]],
        [base / "jpg" / f"{n}.jpg" for n in raw["qimlist"]],
        protocol="revisited",
        gnd=gnd,
        query_boxes=boxes,
        db_labels=labels,
    )


@dataclass
class Availability:
    """What a partial copy of a data set lacks: counted and reported, never an error."""

    db_total: int
    queries_total: int
    db_missing: list[str] = field(default_factory=list)
    queries_missing: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # file -> reason, db or query

    @property
    def db_used(self) -> int:
        return self.db_total - len(self.db_missing) - self._unreadable_among("db")

    @property
    def queries_used(self) -> int:
        return self.queries_total - len(self.queries_missing) - self._unreadable_among("query")

    def _unreadable_among(self, role: str) -> int:
        return sum(1 for reason in self.unreadable.values() if reason.startswith(role))

    def as_dict(self) -> dict[str, object]:
        return {
            "db_total": self.db_total,
            "db_used": self.db_used,
            "db_missing": len(self.db_missing),
            "queries_total": self.queries_total,
            "queries_used": self.queries_used,
            "queries_missing": len(self.queries_missing),
            "unreadable": self.unreadable,
        }


def present_subset(rset: RetrievalSet) -> tuple[RetrievalSet, Availability]:
    """The set restricted to photos on disk that open; the others are counted, not fatal.

    The database becomes the images present (ground-truth indices are renumbered and absent
    positives removed); a query whose photo is absent or unreadable is skipped.
    """
    report = Availability(db_total=len(rset.db_paths), queries_total=len(rset.query_paths))
    db_ok = np.array([_usable(p, "db", report) for p in rset.db_paths], dtype=bool)
    keep = [j for j, p in enumerate(rset.query_paths) if _usable(p, "query", report)]
    if db_ok.all() and len(keep) == len(rset.query_paths):
        return rset, report
    new_index = np.full(len(rset.db_paths), -1, dtype=np.int64)
    new_index[db_ok] = np.arange(int(db_ok.sum()))
    gnd = None
    if rset.gnd is not None:
        gnd = [{key: _renumber(new_index, idx) for key, idx in rset.gnd[j].items()} for j in keep]
    subset = RetrievalSet(
        rset.name,
        [p for p, ok in zip(rset.db_paths, db_ok, strict=True) if ok],
        [rset.query_paths[j] for j in keep],
        protocol=rset.protocol,
        gnd=gnd,
        query_boxes=[rset.query_boxes[j] for j in keep],
        db_labels=None if rset.db_labels is None else rset.db_labels[db_ok],
        label_names=rset.label_names,
    )
    return subset, report


def _renumber(new_index: np.ndarray, idx: np.ndarray) -> np.ndarray:
    mapped = new_index[np.asarray(idx, dtype=np.int64)]
    return mapped[mapped >= 0]


def _usable(path: Path, role: str, report: Availability) -> bool:
    """Whether ``path`` exists and its header opens as an image; the report learns why not."""
    if not path.is_file():
        (report.db_missing if role == "db" else report.queries_missing).append(path.name)
        return False
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - reading the header is the check
    except (OSError, ValueError) as err:
        report.unreadable[str(path)] = f"{role} image is not readable: {err}"
        logger.warning("skipping unreadable image %s: %s", path, err)
        return False
    return True


def same_label_pairs(labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair ``(i, j)``, ``i < j``, of images sharing a label ``>= 0``: whitening's pairs."""
    labels = np.asarray(labels)
    qidxs, pidxs = [], []
    for label in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == label)
        i, j = np.triu_indices(len(members), k=1)
        qidxs.append(members[i])
        pidxs.append(members[j])
    if not qidxs:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(qidxs), np.concatenate(pidxs)


def _box(bbx: Sequence[float] | None) -> tuple[float, float, float, float] | None:
    if bbx is None or len(bbx) == 0:
        return None
    x1, y1, x2, y2 = (float(v) for v in bbx)
    return x1, y1, x2, y2


def _landmark_labels(base: Path, imlist: Sequence[str]) -> np.ndarray | None:
    """Landmark per database image from the built-in collection's ``cameras.parquet``, if any."""
    table_path = base / "cameras.parquet"
    if not table_path.is_file():
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(table_path, columns=["name", "landmark"]).to_pydict()
    by_name = dict(zip(table["name"], table["landmark"], strict=True))
    return np.asarray([by_name.get(n, -1) for n in imlist], dtype=np.int64)
