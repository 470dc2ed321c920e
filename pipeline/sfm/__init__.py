"""The sfm stage: every group of photos reconstructed in parallel Ray tasks with pycolmap.

    python -m pipeline.sfm --images OUT/images.parquet --groups OUT/groups --output OUT/sfm

Each group of ``groups.parquet`` with at least ``--min-images`` photos is one Ray task
(``--cpus-per-task`` CPUs, as many pycolmap threads) running ``pipeline.sfm.reconstruct``: SIFT at
``--max-image-size``, exhaustive matching up to ``--exhaustive-max`` photos, pairs from the
global descriptors (each photo's ``--retrieval-k`` nearest in its group) beyond, geometric
verification, ``--mapper incremental|global``. The tasks run in workers of their own (a runtime
environment no other stage shares), which import neither torch nor anything that does: pycolmap
crashes in feature extraction when torch came first (colmap issue #3477).

Leftover photos the group stage offered to other groups (``candidates.parquet``: singletons and
photos of groups too small to reconstruct, each with its most similar groups) are reconstructed
with each group they were offered to; a photo registered there counts as that group's
(``attached``), and where several models register it, the largest wins.

A group that fails (pycolmap raises, the worker dies — a segfault —, or it runs past
``--timeout-s``) is recorded with its reason and the run goes on. Each finished group is written
at once (``SFM/groups/<group>.json`` with its rows, its models under ``SFM/models/<group>-<m>/``),
so a rerun reconstructs only the groups without a result; ``--retry-failed`` tries failed ones
again. Once every group has a result the tables are assembled:

- ``sfm_images.parquet``: one row per grouped photo: image_id, group_id (where it was
  reconstructed), attached (registered in a group it was only offered to), model_id
  (``<group>-<m>``, null when not registered), registered, cluster_id (the group: models of
  one candidate scene are one cluster, so its photos are never one another's negatives),
  centre_x/y/z, point3d_ids (list, unique within the model), scale (mean focal/depth of its
  observations), observations;
- ``sfm_models.parquet``: model_id, group_id, images, points, mean_reprojection_error,
  mean_track_length, mapper, seconds;
- ``sfm_groups.parquet``: group_id, photos (members and offered leftovers), offered, status
  (``ok``, ``failed``, ``skipped``), reason, seconds; then ``_SUCCESS``.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from cluster.catalog import ImageCatalog
from model import storage
from model.cli import location_problems

__all__ = ["SfmConf", "read_sfm_images", "run"]

logger = logging.getLogger(__name__)

SFM_IMAGES, SFM_MODELS, SFM_GROUPS = (
    "sfm_images.parquet",
    "sfm_models.parquet",
    "sfm_groups.parquet",
)


@dataclass(frozen=True)
class SfmConf:
    """Settings of one reconstruction run; every field is a command-line flag."""

    images: str
    """images.parquet written by pipeline.ingest."""
    groups: str
    """The folder written by pipeline.group."""
    output: str
    mapper: Literal["global", "incremental"] = "global"
    """global mapping registered 359 of the 373 shared photos, incremental 297 (README)."""
    cameras: Literal["exif", "per_image"] = "exif"
    """exif: photos of one size, make, model and focal length share intrinsics; per_image:
    each its own (incremental mapping of phone photos without a sensor size may prefer it)."""
    max_image_size: int = 1024
    max_features: int = 8192
    exhaustive_max: int = 150
    retrieval_k: int = 20
    """Pairs per photo for groups larger than --exhaustive-max (from the group's descriptors)."""
    guided_matching: bool = False
    """Match again under each pair's verified geometry (more inliers; slower)."""
    dsp_sift: bool = False
    """DSP-SIFT features with affine shapes (more robust matching; slower)."""
    min_images: int = 3
    """Groups with fewer photos are reported as skipped, not reconstructed."""
    cpus_per_task: int = 1
    scratch: str | None = None
    """Local folder for each task's working files (default: the system's temporary folder);
    big groups want a fast disk with room for their photos and database."""
    timeout_s: float = 3600.0
    retry_failed: bool = False


def sfm_worker_env(cpus: int) -> dict[str, str]:
    """The SfM workers' environment: their own (no other stage's worker is reused, so none
    that imported torch runs pycolmap), OpenMP held to the task's CPUs (groups side by side
    must not oversubscribe the machine)."""
    return {"CIRRAY_SFM_WORKER": "1", "OMP_NUM_THREADS": str(cpus)}


def _group_uri(out: str, group: int) -> str:
    return storage.join(out, "groups", f"{group:06d}.json")


def _task(
    located: list[Any], options: dict, pairs: list | None, scratch: str | None = None
) -> dict[str, Any]:
    """Runs in an SfM worker: read the group's photos (``cluster.catalog.Photo`` locations in
    images.parquet) straight from storage, reconstruct them, return plain data."""
    from pathlib import Path

    from cluster.catalog import read_photo_bytes
    from pipeline.sfm.reconstruct import ReconstructOptions, reconstruct_group

    data = read_photo_bytes(located)
    photos = [(photo.image_id, data[photo.image_id]) for photo in located]
    if scratch:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    result = reconstruct_group(photos, ReconstructOptions(**options), pairs, scratch)
    return {
        "images": [asdict(r) for r in result.images],
        "models": [asdict(m) for m in result.models],
        "files": result.files,
        "seconds": result.seconds,
        "log": result.log[-20000:],
    }


def _retrieval_pairs(ids: list[str], vectors: np.ndarray, k: int) -> list[tuple[str, str]]:
    """Each photo with its ``k`` nearest photos of the group, each pair once."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argsort(-sims, axis=1)[:, :k]
    pairs = {tuple(sorted((ids[i], ids[j]))) for i in range(len(ids)) for j in nearest[i]}
    return sorted(pairs)


def _check(conf: SfmConf) -> None:
    problems = []
    if conf.min_images < 2:
        problems.append(f"--min-images must be at least 2, not {conf.min_images}")
    if conf.cpus_per_task < 1:
        problems.append(f"--cpus-per-task must be at least 1, not {conf.cpus_per_task}")
    if conf.max_image_size < 64:
        problems.append(f"--max-image-size must be at least 64, not {conf.max_image_size}")
    if conf.timeout_s <= 0:
        problems.append("--timeout-s must be positive")
    problems += location_problems(images=conf.images, groups=conf.groups, output=conf.output)
    if problems:
        raise ValueError("\n".join(problems))


def run(conf: SfmConf) -> str:
    """Reconstruct every group; returns the output URI."""
    import ray

    from pipeline.group import read_candidates, read_groups

    _check(conf)
    out = conf.output.rstrip("/")
    if storage.is_complete(out):
        logger.info("%s is complete; skipping", out)
        return out
    problems = []
    try:
        group_ids, group_of = read_groups(conf.groups)
        offers = read_candidates(conf.groups)
    except (OSError, ValueError) as err:
        problems.append(f"--groups: {err}")
    try:
        catalog = ImageCatalog()  # where each photo's bytes lie; the tasks read them
        catalog.read_table(conf.images)
    except (OSError, ValueError) as err:
        problems.append(f"--images: {err}")
    if problems:
        raise ValueError("\n".join(problems))
    members: dict[int, list[str]] = {}
    for image_id, group in zip(group_ids, group_of.tolist(), strict=True):
        members.setdefault(int(group), []).append(image_id)
    missing = [i for i in group_ids if i not in catalog]
    if missing:
        raise ValueError(f"{len(missing)} grouped photos are not in {conf.images}: {missing[:3]}")
    offered: dict[int, list[str]] = {}
    for image_id, group in offers:
        if group in members and image_id not in members[group]:
            offered.setdefault(group, []).append(image_id)
    photos_of = {g: ids + offered.get(g, []) for g, ids in members.items()}

    statuses: dict[int, dict[str, Any]] = {}
    todo = []
    for group, ids in sorted(members.items()):
        if group < 0 or len(ids) < conf.min_images:
            why = "singletons" if group < 0 else f"{len(ids)} photos, under --min-images"
            statuses[group] = {"status": "skipped", "reason": why, "photos": len(ids)}
            continue
        done = _read_json(_group_uri(out, group))
        if done and (done["status"] == "ok" or not conf.retry_failed):
            statuses[group] = done
        else:
            todo.append(group)
    stored = sum(s["status"] != "skipped" for s in statuses.values())
    if stored:
        logger.info("resuming: %d groups already have a result, %d to go", stored, len(todo))

    if todo:
        pairs = _pairs_for(conf, photos_of, todo)
        if not ray.is_initialized():
            ray.init()
        _reconstruct(conf, out, photos_of, catalog, todo, pairs, statuses)
    _assemble(conf, out, members, offered, statuses)
    return out


def _pairs_for(conf: SfmConf, members: dict[int, list[str]], todo: list[int]) -> dict[int, list]:
    """Retrieval pairs of the groups too large for exhaustive matching."""
    large = [g for g in todo if len(members[g]) > conf.exhaustive_max]
    if not large:
        return {}
    from model.descriptors import read_descriptors

    manifest = json.loads(storage.read_text(storage.join(conf.groups, "manifest.json")))
    desc = read_descriptors(manifest["descriptors"])
    row = {image_id: i for i, image_id in enumerate(desc.image_ids.tolist())}
    pairs = {}
    for group in large:
        ids = [i for i in members[group] if i in row]
        pairs[group] = _retrieval_pairs(ids, desc.vectors[[row[i] for i in ids]], conf.retrieval_k)
    return pairs


def _reconstruct_options(conf: SfmConf) -> dict[str, Any]:
    """``pipeline.sfm.reconstruct.ReconstructOptions`` of these flags (same names, but threads =
    --cpus-per-task and the smallest model = --min-images)."""
    from dataclasses import fields

    from pipeline.sfm.reconstruct import ReconstructOptions

    same = {
        f.name: getattr(conf, f.name) for f in fields(ReconstructOptions) if hasattr(conf, f.name)
    }
    return {**same, "threads": conf.cpus_per_task, "min_model_size": conf.min_images}


def _reconstruct(
    conf: SfmConf,
    out: str,
    members: dict[int, list[str]],
    catalog: ImageCatalog,
    todo: list[int],
    pairs: dict[int, list],
    statuses: dict[int, dict[str, Any]],
) -> None:
    import ray
    from tqdm import tqdm

    options = _reconstruct_options(conf)
    # Workers of their own: a runtime env no other stage uses, so no worker that ever imported
    # torch (the extract stage's) runs pycolmap.
    task = ray.remote(_task).options(
        num_cpus=conf.cpus_per_task,
        max_retries=0,
        runtime_env={"env_vars": sfm_worker_env(conf.cpus_per_task)},
    )
    # As many tasks in flight as the cluster has slots for, so a task's clock starts when it
    # does (the time limit is per group, not per place in the queue).
    slots = max(1, int(ray.cluster_resources().get("CPU", 1)) // conf.cpus_per_task)
    queue = list(todo)
    running: dict[Any, tuple[int, float]] = {}
    bar = tqdm(total=len(todo), desc="sfm groups", unit="group")

    def finish(group: int, status: dict[str, Any]) -> None:
        _store(out, group, status)
        statuses[group] = status
        bar.update()
        bar.set_postfix_str(f"group {group}: {status['status']}")

    while queue or running:
        while queue and len(running) < slots:
            group = queue.pop(0)
            photos = [catalog.photo(i) for i in members[group]]
            ref = task.remote(photos, options, pairs.get(group), conf.scratch)
            running[ref] = (group, time.monotonic())
        done, _ = ray.wait(list(running), num_returns=1, timeout=min(2.0, conf.timeout_s))
        now = time.monotonic()
        for ref in done:
            group, t0 = running.pop(ref)
            finish(group, _finished(ray, ref, len(members[group]), now - t0))
        for ref, (group, t0) in list(running.items()):
            if now - t0 > conf.timeout_s:
                ray.cancel(ref, force=True)  # kills the worker: pycolmap cannot be interrupted
                running.pop(ref)
                reason = f"ran past --timeout-s {conf.timeout_s:g}"
                finish(group, {"status": "failed", "reason": reason,
                               "photos": len(members[group]), "seconds": now - t0})  # fmt: skip
    bar.close()


def _finished(ray: Any, ref: Any, photos: int, seconds: float) -> dict[str, Any]:
    try:
        result = ray.get(ref)
    except ray.exceptions.WorkerCrashedError as err:
        reason = f"pycolmap crashed the worker (a segfault or abort): {str(err)[:300]}"
        return {"status": "failed", "reason": reason, "photos": photos, "seconds": seconds}
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if err.cause is not None else err
        reason = f"{type(cause).__name__}: {str(cause).splitlines()[0][:300]}"
        return {"status": "failed", "reason": reason, "photos": photos, "seconds": seconds}
    except ray.exceptions.RayError as err:
        return {"status": "failed", "reason": str(err)[:300], "photos": photos, "seconds": seconds}
    result["phase_seconds"] = result.pop("seconds")
    result["status"] = "ok" if result["models"] else "failed"
    result["reason"] = None if result["models"] else "no model: too few verified matches"
    result["photos"] = photos
    result["seconds"] = seconds
    return result


def _store(out: str, group: int, status: dict[str, Any]) -> None:
    """The group's model files, then its result (last: a result means the models are there)."""
    files = status.pop("files", {}) or {}
    for name, data in files.items():
        model, _, file = name.partition("/")
        storage.write_bytes(storage.join(out, "models", f"{group}-{model}", file), data)
    log = status.pop("log", "")
    if log:
        storage.write_text(storage.join(out, "logs", f"{group:06d}.log"), log)
    storage.write_text(_group_uri(out, group), json.dumps(status))


def _read_json(uri: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(uri))
    except (OSError, ValueError):
        return None


def _assemble(
    conf: SfmConf,
    out: str,
    members: dict[int, list[str]],
    offered: dict[int, list[str]],
    statuses: dict[int, dict],
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows_of: dict[str, list[dict[str, Any]]] = {}  # every row each photo got
    model_rows, group_rows = [], []
    for group, status in sorted(statuses.items()):
        extra = offered.get(group, []) if status["status"] != "skipped" else []
        group_rows.append({"group_id": group, "photos": status.get("photos", 0),
                           "offered": len(extra), "status": status["status"],
                           "reason": status.get("reason"),
                           "seconds": float(status.get("seconds") or 0.0)})  # fmt: skip
        by_id = {r["image_id"]: r for r in status.get("images", [])}
        model_size = {m["model"]: m["images"] for m in status.get("models", [])}
        for image_id in members[group] + extra:
            r = by_id.get(image_id, {})
            registered = bool(r.get("registered"))
            centre = r.get("centre") or (None, None, None)
            rows_of.setdefault(image_id, []).append({
                "image_id": image_id,
                "group_id": group,
                "attached": registered and image_id in extra,
                "model_id": f"{group}-{r['model']}" if registered else None,
                "registered": registered,
                "cluster_id": group if group >= 0 else None,
                "centre_x": centre[0], "centre_y": centre[1], "centre_z": centre[2],
                "point3d_ids": r.get("point_ids", []) if registered else [],
                "scale": r.get("scale"),
                "observations": int(r.get("observations", 0)),
                "_model_size": model_size.get(r.get("model"), 0) if registered else 0,
                "_own": image_id not in extra,
            })  # fmt: skip
        for m in status.get("models", []):
            model_rows.append({
                "model_id": f"{group}-{m['model']}", "group_id": group, "images": m["images"],
                "points": m["points"], "mean_reprojection_error": m["mean_reprojection_error"],
                "mean_track_length": m["mean_track_length"], "mapper": conf.mapper,
                "seconds": float(status.get("seconds") or 0.0),
            })  # fmt: skip
    image_rows = [_best_row(rows) for rows in rows_of.values()]
    schemas = {
        SFM_IMAGES: pa.schema([
            ("image_id", pa.string()), ("group_id", pa.int64()), ("attached", pa.bool_()),
            ("model_id", pa.string()), ("registered", pa.bool_()), ("cluster_id", pa.int64()),
            ("centre_x", pa.float64()), ("centre_y", pa.float64()), ("centre_z", pa.float64()),
            ("point3d_ids", pa.list_(pa.int64())), ("scale", pa.float64()),
            ("observations", pa.int64()),
        ]),
        SFM_MODELS: pa.schema([
            ("model_id", pa.string()), ("group_id", pa.int64()), ("images", pa.int64()),
            ("points", pa.int64()), ("mean_reprojection_error", pa.float64()),
            ("mean_track_length", pa.float64()), ("mapper", pa.string()), ("seconds", pa.float64()),
        ]),
        SFM_GROUPS: pa.schema([
            ("group_id", pa.int64()), ("photos", pa.int64()), ("offered", pa.int64()),
            ("status", pa.string()),
            ("reason", pa.string()), ("seconds", pa.float64()),
        ]),
    }  # fmt: skip
    for name, rows in (
        (SFM_IMAGES, image_rows),
        (SFM_MODELS, model_rows),
        (SFM_GROUPS, group_rows),
    ):
        table = pa.Table.from_pylist(rows, schema=schemas[name])
        sink = io.BytesIO()
        pq.write_table(table, sink)
        storage.write_bytes(storage.join(out, name), sink.getvalue())
    registered = sum(r["registered"] for r in image_rows)
    summary = {
        "format": 1,
        "settings": asdict(conf),
        "photos": len(image_rows),
        "registered": registered,
        "attached": sum(r["attached"] for r in image_rows),
        "models": len(model_rows),
        "groups": {
            s: sum(g["status"] == s for g in group_rows) for s in ("ok", "failed", "skipped")
        },
        "failed": {g["group_id"]: g["reason"] for g in group_rows if g["status"] == "failed"},
    }
    storage.write_text(storage.join(out, storage.SUCCESS), json.dumps(summary, indent=2))
    logger.info(
        "sfm: %d of %d photos registered (%d of them leftovers attached) in %d models; groups %s%s",
        registered,
        len(image_rows),
        summary["attached"],
        len(model_rows),
        summary["groups"],
        "; failed: " + "; ".join(f"{g}: {r}" for g, r in summary["failed"].items())
        if summary["failed"]
        else "",
    )


def _best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A photo's row: the largest model that registers it (its own group's on a tie), else its
    own group's."""
    best = max(rows, key=lambda r: (r["registered"], r["_model_size"], r["_own"]))
    if not best["registered"]:
        best = next(r for r in rows if r["_own"])
    return {k: v for k, v in best.items() if not k.startswith("_")}


def read_sfm_images(uri: str) -> Any:
    """The ``sfm_images.parquet`` table of a complete sfm output, as a pyarrow Table."""
    import pyarrow.parquet as pq

    out = uri.rstrip("/")
    if not storage.is_complete(out):
        raise ValueError(f"{out} is not a complete sfm output (no {storage.SUCCESS})")
    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, SFM_IMAGES))))
