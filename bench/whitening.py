"""Lw from few pairs: the paper's against the cross-validated one, on held-out scenes.

``python -m bench.whitening --descriptors OUT/descriptors --pairs OUT/pairs``: for each seed,
the pairs' clusters are split as ``pipeline.train`` splits them (``--held-out`` of the queries
in whole clusters, never learned from); Lw is learned from the training clusters only (their
whitening pairs, their photos' scatter), once as the paper does (no shrinkage, every dimension)
and once with the shrinkage and output size that cross-validation over the training clusters
picks (``pipeline.whiten``'s default, and the training stage's). Printed: the held-out
queries' mAP against the whole pool without whitening, with the paper's Lw and with the chosen
one. Same code as ``pipeline.train``'s final step (:func:`model.whitening_fit.held_out_whitening`).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import tyro

from bench import write_results
from model.descriptors import read_descriptors
from model.training_set import read_training_set
from model.whitening_fit import LwFit, held_out_whitening, read_whitening_pairs


@dataclass(frozen=True)
class BenchConf:
    descriptors: str
    """pipeline.extract's output for the collection (the off-the-shelf network, say)."""
    pairs: str
    """pipeline.pairs' output mined from the collection's SfM."""
    held_out: float = 0.2
    seeds: tuple[int, ...] = field(default=(0, 1, 2, 3))
    out: str | None = "bench/results/whitening_real_cpu.json"


def main(conf: BenchConf) -> dict:
    desc = read_descriptors(conf.descriptors)
    pool, pairs = read_training_set(conf.pairs), read_whitening_pairs(conf.pairs)
    settings = desc.manifest.get("settings") or {}
    lines = [
        f"device: {platform.machine()} CPU, {os.cpu_count()} cores; {len(desc.image_ids)} photos "
        f"described at {settings.get('max_size')} px by {desc.manifest['network'].get('weights')}",
        f"held out: {conf.held_out:.0%} of the queries in whole clusters; mAP of their queries "
        "against the whole pool"
        + (
            "; positives their 3D model's photos, the rest of their cluster junk"
            if pool.models is not None
            else ""
        ),
        f"{'seed':<6}{'pairs':>6}{'plain':>9}{'paper Lw':>10}{'chosen Lw':>11}  chosen",
    ]
    rows = []
    for seed in conf.seeds:
        args = {"pairs": pairs, "held_out": conf.held_out, "seed": seed}
        data = (desc.image_ids, desc.vectors, pool)
        paper_fit = LwFit(whiten_shrinkage=0.0, whiten_dim=desc.vectors.shape[1])
        *_, paper = held_out_whitening(*data, **args, fit=paper_fit)
        *_, chosen = held_out_whitening(*data, **args)
        rows.append({"seed": seed, "paper": paper, "chosen": chosen})
        lines.append(
            f"{seed:<6}{chosen['pairs']:>6}{chosen['val_map']:>9.4f}{paper['val_map_lw']:>10.4f}"
            f"{chosen['val_map_lw']:>11.4f}  shrinkage {chosen['shrinkage']:g}, "
            f"dim {chosen['dim']}"
        )
    mean = {
        key: sum(r[src][key] for r in rows) / len(rows)
        for key, src in (("val_map", "chosen"), ("val_map_lw", "paper"))
    }
    mean_chosen = sum(r["chosen"]["val_map_lw"] for r in rows) / len(rows)
    lines.append(
        f"{'mean':<12}{mean['val_map']:>9.4f}{mean['val_map_lw']:>10.4f}{mean_chosen:>11.4f}"
    )
    print("\n".join(lines))
    write_results(conf.out, {"splits": rows, "lines": lines}, lines)
    return {"splits": rows}


if __name__ == "__main__":
    main(tyro.cli(BenchConf))
