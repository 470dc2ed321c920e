"""A photo set to evaluate retrieval on, with what counts as a right answer and what is missing.

One type (``RetrievalSet``) for every kind of set; its ``protocol`` says how to score it:

- ``"revisited"``: Revisited Oxford/Paris and the built-in collection (``easy``/``hard``/``junk``
  per query, Easy/Medium/Hard mAP);
- ``"original"``: the original Oxford5k/Paris6k ground truth (``ok``/``junk``, one mAP);
- ``"scenes"``: a folder per scene, every photo a query of its scene (``ok``/``junk``, the photo
  itself junk);
- ``"none"``: a flat folder, results without ground truth.

``Availability`` counts what a set lacks (missing files, unusable photos with their reason) so a
partial or damaged copy is evaluated on what is there, with every problem reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "IMAGE_SUFFIXES",
    "PROTOCOLS",
    "Availability",
    "RetrievalSet",
    "list_images",
    "same_label_pairs",
    "subset",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PROTOCOLS = ("revisited", "original", "scenes", "none")


@dataclass
class RetrievalSet:
    """A database, queries (optionally cropped) and, when known, each query's ground truth.

    ``db_labels`` gives a scene or landmark per database image where known (-1 for
    distractors), which whitening uses for its pairs. ``exif_transpose`` is how its photos must
    be read: False for the revisited layout (boxes are in stored pixels), True for folders.
    """

    name: str
    db_paths: list[Path]
    query_paths: list[Path]
    protocol: str
    exif_transpose: bool
    gnd: list[dict[str, np.ndarray]] | None = None
    query_boxes: list[tuple[float, float, float, float] | None] = field(default_factory=list)
    db_labels: np.ndarray | None = None
    label_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; one of {PROTOCOLS}")
        if not self.query_boxes:
            self.query_boxes = [None] * len(self.query_paths)
        if self.gnd is not None and len(self.gnd) != len(self.query_paths):
            raise ValueError(f"{len(self.gnd)} ground-truth entries for {len(self.query_paths)}")

    @property
    def queries_are_database(self) -> bool:
        """Folders query with their own database photos: query j is database image j."""
        return self.protocol in ("scenes", "none")

    def positives(self, j: int) -> np.ndarray:
        """Database indices that count as right for query j (Medium for revisited sets)."""
        g = self.gnd[j] if self.gnd is not None else {}
        if self.protocol == "revisited":
            return np.concatenate([g["easy"], g["hard"]])
        return np.asarray(g.get("ok", []), dtype=np.int64)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def subset(rset: RetrievalSet, db_keep: np.ndarray, query_keep: Sequence[int]) -> RetrievalSet:
    """The set restricted to the database images where ``db_keep`` and the queries listed.

    Ground-truth indices are renumbered and positives that left the database removed. For
    folders, whose queries are their database photos, a photo leaves both roles at once.
    """
    db_keep = np.asarray(db_keep, dtype=bool)
    query_keep = list(query_keep)
    if rset.queries_are_database:
        both = db_keep.copy()
        both[[j for j in range(len(rset.query_paths)) if j not in set(query_keep)]] = False
        db_keep, query_keep = both, np.flatnonzero(both).tolist()
    if db_keep.all() and len(query_keep) == len(rset.query_paths):
        return rset
    new_index = np.full(len(rset.db_paths), -1, dtype=np.int64)
    new_index[db_keep] = np.arange(int(db_keep.sum()))
    gnd = None
    if rset.gnd is not None:
        gnd = [
            {key: _renumber(new_index, idx) for key, idx in rset.gnd[j].items()} for j in query_keep
        ]
    return RetrievalSet(
        rset.name,
        [p for p, ok in zip(rset.db_paths, db_keep, strict=True) if ok],
        [rset.query_paths[j] for j in query_keep],
        protocol=rset.protocol,
        exif_transpose=rset.exif_transpose,
        gnd=gnd,
        query_boxes=[rset.query_boxes[j] for j in query_keep],
        db_labels=None if rset.db_labels is None else rset.db_labels[db_keep],
        label_names=rset.label_names,
    )


def _renumber(new_index: np.ndarray, idx: np.ndarray) -> np.ndarray:
    mapped = new_index[np.asarray(idx, dtype=np.int64)]
    return mapped[mapped >= 0]


@dataclass
class Availability:
    """What a set lacks: missing files and unusable photos by role, each with its reason.

    A photo that is both a query and a database image (folders) is counted once in each role.
    """

    db_total: int
    queries_total: int
    db_missing: list[str] = field(default_factory=list)
    queries_missing: list[str] = field(default_factory=list)
    db_unusable: dict[str, str] = field(default_factory=dict)  # file -> reason
    queries_unusable: dict[str, str] = field(default_factory=dict)
    distractors_total: int = 0
    distractors_unusable: dict[str, str] = field(default_factory=dict)

    @property
    def db_used(self) -> int:
        return self.db_total - len(self.db_missing) - len(self.db_unusable)

    @property
    def queries_used(self) -> int:
        return self.queries_total - len(self.queries_missing) - len(self.queries_unusable)

    def problems(self) -> list[dict[str, str]]:
        """Every unusable photo as ``{"file", "role", "reason"}``, for reports and metrics."""
        out = []
        for role, table in (
            ("db", self.db_unusable),
            ("query", self.queries_unusable),
            ("distractor", self.distractors_unusable),
        ):
            out += [{"file": f, "role": role, "reason": r} for f, r in table.items()]
        return out

    def as_dict(self) -> dict[str, object]:
        return {
            "db_total": self.db_total,
            "db_used": self.db_used,
            "db_missing": len(self.db_missing),
            "queries_total": self.queries_total,
            "queries_used": self.queries_used,
            "queries_missing": len(self.queries_missing),
            "distractors": self.distractors_total - len(self.distractors_unusable),
            "distractors_total": self.distractors_total,
            "unusable": self.problems(),
        }

    def summary(self) -> str:
        """One line for the console, then one per problem."""
        line = (
            f"database: {self.db_used} of {self.db_total} images ({len(self.db_missing)} missing, "
            f"{len(self.db_unusable)} unusable); queries: {self.queries_used} of "
            f"{self.queries_total} ({len(self.queries_missing)} missing, "
            f"{len(self.queries_unusable)} unusable)"
        )
        if self.distractors_total:
            line += (
                f"; distractors: {self.distractors_total - len(self.distractors_unusable)} of "
                f"{self.distractors_total}"
            )
        return "\n".join([line, *(f"  {p['role']}: {p['reason']}" for p in self.problems())])


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
