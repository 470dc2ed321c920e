"""The command line: generate a preset, print where it is and what it holds."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import tyro

from model.datasets.landmarks.conf import CONFS
from model.datasets.landmarks.dataset import load_ground_truth
from model.datasets.landmarks.publish import generate


@dataclass(frozen=True)
class Args:
    """Generate the built-in landmark collection."""

    conf: Literal["tiny", "demo", "sfm"] = "demo"
    """Named preset of model.datasets.landmarks.CONFS."""
    root: str = "data"
    """Directory or s3:// URI to write <root>/<name>/ into."""
    seed: int | None = None
    """Another seed than the preset's; the name gets a -s<seed> suffix."""
    overwrite: bool = False
    """Regenerate even when a complete collection is there."""


def main(argv: Sequence[str] | None = None) -> Path | str:
    """The command line: generate a preset, print where it is and what it holds."""
    args = tyro.cli(Args, args=argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    conf = CONFS[args.conf]
    if args.seed is not None:
        conf = replace(conf, seed=args.seed, name=f"{conf.name}-s{args.seed}")
    path = generate(conf, args.root, overwrite=args.overwrite, progress=sys.stderr.isatty())
    ground_truth = load_ground_truth(path)
    positives = sum(len(g["easy"]) + len(g["hard"]) for g in ground_truth["gnd"])
    print(path)
    print(
        f"{len(ground_truth['imlist'])} database images ({conf.num_distractors} distractors), "
        f"{len(ground_truth['qimlist'])} queries, {conf.num_landmarks} landmarks, "
        f"{positives} positive pairs"
    )
    return path
