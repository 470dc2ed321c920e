"""The sfm stage: every group of photos reconstructed in parallel Ray tasks with pycolmap.

    python -m pipeline.sfm --images OUT/images.parquet --groups OUT/groups --output OUT/sfm

Each group of the group stage's output with at least ``--min-images`` photos is one Ray task
(``--cpus-per-task`` CPUs, as many pycolmap threads) running ``pipeline.sfm.reconstruct``: SIFT at
``--max-image-size``, exhaustive matching up to ``--exhaustive-max`` photos, pairs from the
global descriptors (each photo's ``--retrieval-k`` nearest in its group) beyond, geometric
verification, ``--mapper incremental|global``. The tasks run in workers of their own (a runtime
environment no other stage shares), which import neither torch nor anything that does: pycolmap
crashes in feature extraction when torch came first (colmap issue #3477).

Leftover photos the group stage offered to other groups (its candidates: singletons and
photos of groups too small to reconstruct, each with its most similar groups) are reconstructed
with each group they were offered to; a photo registered there counts as that group's
(``attached``), and where several models register it, the largest wins.

A group that fails (pycolmap raises, the worker dies — a segfault —, or it runs past
``--timeout-s``) is recorded with its reason and the run goes on. Each finished group is written
at once (``SFM/groups/<group>.json`` with its rows, its models under ``SFM/models/<group>-<m>/``)
with the key of what it was made from (its photos, the reconstruction settings and, for a group
matched by retrieval pairs, the descriptors). A rerun with the same inputs and settings skips;
one after an interruption, or with another grouping or other photos upstream, reconstructs only
the groups without a result of the same key; ``--retry-failed`` tries failed ones again; other
settings stop with a line naming them, unless ``--overwrite``. Once every group has a result
the tables are assembled:

- ``tables.SFM_IMAGES``: one row per grouped photo: image_id, group_id (where it was
  reconstructed), attached (registered in a group it was only offered to), model_id
  (``<group>-<m>``, null when not registered), registered, cluster_id (the group: models of
  one candidate scene are one cluster, so its photos are never one another's negatives),
  centre_x/y/z, point3d_ids (list, unique within the model), scale (mean focal/depth of its
  observations), observations;
- ``tables.SFM_MODELS``: model_id, group_id, images, points, mean_reprojection_error,
  mean_track_length, mapper, seconds;
- ``tables.SFM_GROUPS``: group_id, photos (members and offered leftovers), offered, status
  (``ok``, ``failed``, ``skipped``), reason, seconds;

then the manifest (``tables.SFM_OUTPUT``), whose details count the photos, models and groups,
and name the groups reconstructed by this run and those whose stored result was reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
from tqdm import tqdm

from cluster.catalog import ImageCatalog, read_photo_bytes
from cluster.resources import check_schedulable, reachable_resources
from model import storage, tables
from model.cli import location_problems, log_settings
from model.descriptors import read_descriptors
from model.settings import raise_problems
from pipeline.sfm.reconstruct import (
    ReconstructOptions,
    dumps_result,
    loads_result,
    reconstruct_group,
)

__all__ = ["SfmConf", "content_settings", "group_key", "run", "task_scratch"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SfmConf:
    """Settings of one reconstruction run; every field is a command-line flag."""

    images: str
    """The output of pipeline.ingest."""
    groups: str
    """The output of pipeline.group."""
    output: str
    mapper: Literal["global", "incremental"] = "global"
    """global (GLOMAP's, in pycolmap 4) or incremental (COLMAP's)."""
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
    max_in_flight: int | None = None
    """Groups submitted at once: default as many as the cluster can reach CPUs for (its
    autoscaler's node types count), so waiting groups start new nodes."""
    node_retries: int = 3
    """Times a group whose node was lost (a spot worker preempted) is submitted again; a crash
    of pycolmap itself is a failed group, never retried."""
    retry_failed: bool = False
    overwrite: bool = False
    """Replace an output made with other settings (else the run stops, naming them)."""


def sfm_worker_env(cpus: int) -> dict[str, str]:
    """The SfM workers' environment: their own (no other stage's worker is reused, so none
    that imported torch runs pycolmap), OpenMP held to the task's CPUs (groups side by side
    must not oversubscribe the machine)."""
    return {"CIRRAY_SFM_WORKER": "1", "OMP_NUM_THREADS": str(cpus)}


def _group_uri(out: str, group: int) -> str:
    return storage.join(out, "groups", f"{group:06d}.json")


STARTED = "started"
"""What a group's task yields first, once a worker runs it: its time limit counts from here."""


def _task(
    located: list[Any], options: dict, pairs: list | None, *, scratch: str | None = None
) -> Iterator[str | dict[str, Any]]:
    """Runs in an SfM worker as a Ray generator task: yields ``STARTED`` (a group may wait
    minutes for the autoscaler to start its node, which is no part of its time), then reads
    the group's photos (``cluster.catalog.Photo`` locations in the images table) straight
    from storage, reconstructs them and yields plain data."""
    yield STARTED
    data = read_photo_bytes(located)
    photos = [(photo.image_id, data[photo.image_id]) for photo in located]
    with task_scratch(scratch) as folder:
        result = reconstruct_group(photos, ReconstructOptions(**options), pairs, scratch=folder)
    yield {
        "images": [asdict(r) for r in result.images],
        "models": [asdict(m) for m in result.models],
        "files": result.files,
        "seconds": result.seconds,
        "log": result.log[-20000:],
    }


@contextlib.contextmanager
def task_scratch(scratch: str | None) -> Iterator[str]:
    """A scratch folder of this worker process's own, under ``scratch`` (default: the system's
    temporary folder), removed when the task ends; folders left by workers that are gone (a
    task cancelled by force, a node's worker killed) are removed first."""
    root = Path(scratch or tempfile.gettempdir()) / "cirray-sfm-tasks"
    root.mkdir(parents=True, exist_ok=True)
    for folder in root.iterdir():
        if folder.name.isdigit() and not _process_alive(int(folder.name)):
            logger.info("removing %s, left by a worker that is gone", folder)
            shutil.rmtree(folder, ignore_errors=True)
    own = root / str(os.getpid())
    own.mkdir(exist_ok=True)
    try:
        yield str(own)
    finally:
        shutil.rmtree(own, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


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
    if conf.max_in_flight is not None and conf.max_in_flight < 1:
        problems.append(f"--max-in-flight must be at least 1, not {conf.max_in_flight}")
    if conf.node_retries < 0:
        problems.append(f"--node-retries must be 0 or more, not {conf.node_retries}")
    problems += location_problems(images=conf.images, groups=conf.groups, output=conf.output)
    raise_problems(problems)


_NOT_CONTENT = frozenset(
    (
        "images",
        "groups",
        "output",
        "cpus_per_task",
        "scratch",
        "timeout_s",
        "max_in_flight",
        "node_retries",
        "retry_failed",
        "overwrite",
    )
)


def content_settings(conf: SfmConf) -> dict[str, Any]:
    """The settings that change the models (not where things lie, CPUs, time limits, retries)."""
    return {k: v for k, v in asdict(conf).items() if k not in _NOT_CONTENT}


@dataclass(frozen=True)
class _Groups:
    """The grouping to reconstruct: each group's members and the leftovers offered to it."""

    members: dict[int, list[str]]
    offered: dict[int, list[str]]

    def photos(self, group: int) -> list[str]:
        return self.members[group] + self.offered.get(group, [])


def _read_groups(groups: tables.Manifest) -> _Groups:
    """Each group's members and the offers to it (an offer of a member to its own group, or
    to a group that does not exist, is dropped)."""
    table = tables.GROUPS.read_from(groups)
    offers = tables.CANDIDATES.read_from(groups, ["image_id", "group_id"])
    members: dict[int, list[str]] = {}
    for image_id, group in zip(
        table["image_id"].to_pylist(), table["group_id"].to_pylist(), strict=True
    ):
        members.setdefault(int(group), []).append(image_id)
    offered: dict[int, list[str]] = {}
    for image_id, group in zip(
        offers["image_id"].to_pylist(), offers["group_id"].to_pylist(), strict=True
    ):
        if group in members and image_id not in members[group]:
            offered.setdefault(int(group), []).append(image_id)
    return _Groups(members, offered)


def _catalog(conf: SfmConf, grouping: _Groups) -> ImageCatalog:
    """Where each grouped photo's bytes lie (the tasks read them)."""
    catalog = ImageCatalog([conf.images])
    missing = [i for ids in grouping.members.values() for i in ids if i not in catalog]
    if missing:
        raise ValueError(
            f"--images: {len(missing)} grouped photos are not in {conf.images}: {missing[:3]}"
        )
    return catalog


def group_key(photos: list[str], settings: dict[str, Any], descriptors: str | None) -> str:
    """What one group's result is made from: its photos, the reconstruction settings and, for a
    group matched by retrieval pairs, the descriptors' identity. A stored result with this key
    is reused."""
    payload = {"photos": sorted(photos), "settings": settings, "descriptors": descriptors}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def _matched_by_pairs(conf: SfmConf, grouping: _Groups, group: int) -> bool:
    """Whether a group is too large to match every pair (retrieval pairs instead)."""
    return len(grouping.photos(group)) > conf.exhaustive_max


def _keys(conf: SfmConf, grouping: _Groups, groups: tables.Manifest) -> dict[int, str]:
    settings = content_settings(conf)
    descriptors = groups.inputs.get("descriptors")
    return {
        g: group_key(
            grouping.photos(g),
            settings,
            descriptors if _matched_by_pairs(conf, grouping, g) else None,
        )
        for g in grouping.members
        if g >= 0 and len(grouping.members[g]) >= conf.min_images
    }


def _plan_groups(
    conf: SfmConf, out: str, grouping: _Groups, *, keys: dict[int, str]
) -> tuple[dict[int, dict[str, Any]], list[int]]:
    """The groups' results known without reconstructing (groups skipped, stored results made
    from the same photos and settings), and the groups to reconstruct."""
    statuses: dict[int, dict[str, Any]] = {}
    todo = []
    for group, ids in sorted(grouping.members.items()):
        if group not in keys:
            why = "singletons" if group < 0 else f"{len(ids)} photos, under --min-images"
            statuses[group] = {"status": "skipped", "reason": why, "photos": len(ids)}
            continue
        done = _read_json(_group_uri(out, group))
        reusable = done is not None and done.get("key") == keys[group]
        if reusable and (done["status"] == "ok" or not conf.retry_failed):
            statuses[group] = done
        else:
            todo.append(group)
    stored = sum(s["status"] != "skipped" for s in statuses.values())
    if stored:
        logger.info("resuming: %d groups already have a result, %d to go", stored, len(todo))
    return statuses, todo


def run(conf: SfmConf) -> str:
    """Reconstruct every group; returns the output folder."""
    _check(conf)
    log_settings(logger, "sfm", conf)
    out = tables.resolve(conf.output)
    inputs = tables.upstream(
        groups=(tables.GROUPS_OUTPUT, conf.groups), images=(tables.IMAGES_OUTPUT, conf.images)
    )
    groups = inputs["groups"]
    settings = content_settings(conf)
    plan, done = tables.SFM_OUTPUT.plan(out, inputs, settings, overwrite=conf.overwrite)
    if plan == "skip" and not (conf.retry_failed and done is not None and done.details["failed"]):
        logger.info("%s is complete; skipping", out)
        return out
    grouping = _read_groups(groups)
    catalog = _catalog(conf, grouping)
    keys = _keys(conf, grouping, groups)
    statuses, todo = _plan_groups(conf, out, grouping, keys=keys)
    tables.SFM_OUTPUT.unpublish(out)
    if todo:
        pairs = _pairs_for(conf, grouping, todo, groups=groups)
        if not ray.is_initialized():
            ray.init()
        work = _Work(todo=todo, pairs=pairs, keys=keys)
        _reconstruct(conf, out, grouping, catalog=catalog, work=work, statuses=statuses)
    details = _assemble(conf, out, grouping, statuses=statuses, reconstructed=todo)
    tables.SFM_OUTPUT.publish(out, inputs=inputs, settings=settings, details=details)
    _log(details)
    return out


def _pairs_for(
    conf: SfmConf, grouping: _Groups, todo: list[int], *, groups: tables.Manifest
) -> dict[int, list]:
    """Retrieval pairs of the groups too large for exhaustive matching, from the descriptors
    the grouping was made from."""
    large = [g for g in todo if _matched_by_pairs(conf, grouping, g)]
    if not large:
        return {}
    desc = read_descriptors(groups.source("descriptors"))
    row = {image_id: i for i, image_id in enumerate(desc.image_ids.tolist())}
    pairs = {}
    for group in large:
        ids = [i for i in grouping.photos(group) if i in row]
        pairs[group] = _retrieval_pairs(ids, desc.vectors[[row[i] for i in ids]], conf.retrieval_k)
    return pairs


def _reconstruct_options(conf: SfmConf) -> dict[str, Any]:
    """``pipeline.sfm.reconstruct.ReconstructOptions`` of these flags (same names, but threads =
    --cpus-per-task and the smallest model = --min-images)."""
    same = {
        f.name: getattr(conf, f.name) for f in fields(ReconstructOptions) if hasattr(conf, f.name)
    }
    return {**same, "threads": conf.cpus_per_task, "min_model_size": conf.min_images}


@dataclass(frozen=True)
class _Work:
    """The groups to reconstruct, the retrieval pairs of the large ones, every group's key."""

    todo: list[int]
    pairs: dict[int, list]
    keys: dict[int, str]


def _reconstruct(
    conf: SfmConf,
    out: str,
    grouping: _Groups,
    *,
    catalog: ImageCatalog,
    work: _Work,
    statuses: dict[int, dict[str, Any]],
) -> None:
    """Run the groups of ``todo`` as Ray tasks, as many at a time as the cluster has slots,
    each stored as soon as it ends (or fails, or runs past --timeout-s)."""
    todo, pairs, keys = work.todo, work.pairs, work.keys
    options = _reconstruct_options(conf)
    check_schedulable("--cpus-per-task", {"CPU": conf.cpus_per_task})
    # Workers of their own: a runtime env no other stage uses, so no worker that ever imported
    # torch (the extract stage's) runs pycolmap.
    task = ray.remote(_task).options(
        num_cpus=conf.cpus_per_task,
        num_returns="streaming",
        max_retries=0,
        runtime_env={"env_vars": sfm_worker_env(conf.cpus_per_task)},
    )
    # As many tasks in flight as the cluster can reach CPUs for: the autoscaler starts nodes
    # for those waiting. A group's clock starts when its task does.
    reachable = int(reachable_resources().get("CPU", 1))
    slots = conf.max_in_flight or max(1, reachable // conf.cpus_per_task)
    queue = list(todo)
    running: dict[Any, _Running] = {}
    lost: Counter[int] = Counter()
    bar = tqdm(total=len(todo), desc="sfm groups", unit="group")

    def finish(group: int, status: dict[str, Any]) -> None:
        status["key"] = keys[group]
        _store(out, group, status)
        statuses[group] = status
        bar.update()
        bar.set_postfix_str(f"group {group}: {status['status']}")

    while queue or running:
        while queue and len(running) < slots:
            group = queue.pop(0)
            photos = [catalog.photo(i) for i in grouping.photos(group)]
            tasks = task.remote(photos, options, pairs.get(group), scratch=conf.scratch)
            running[tasks] = _Running(group)
        done, _ = ray.wait(list(running), num_returns=1, timeout=min(2.0, conf.timeout_s))
        now = time.monotonic()
        for tasks in done:
            run = running[tasks]
            ref = next(tasks)
            if run.started is None and _says_started(ref):
                run.started = now
                continue
            del running[tasks]
            group, seconds = run.group, now - (run.started or now)
            status = _finished(ref, len(grouping.members[group]), seconds)
            if status is None:  # its node was lost: a spot worker preempted, not pycolmap
                lost[group] += 1
                if lost[group] <= conf.node_retries:
                    logger.warning("group %d: its node was lost; submitting it again", group)
                    queue.insert(0, group)
                    continue
                reason = f"its node was lost {lost[group]} times (--node-retries)"
                status = _failed(reason, len(grouping.members[group]), seconds)
            finish(group, status)
        for tasks, run in list(running.items()):
            if run.started is not None and now - run.started > conf.timeout_s:
                ray.cancel(tasks, force=True)  # kills the worker: pycolmap cannot be interrupted
                del running[tasks]
                reason = f"ran past --timeout-s {conf.timeout_s:g}"
                photos = len(grouping.members[run.group])
                finish(run.group, _failed(reason, photos, now - run.started))
    bar.close()


@dataclass
class _Running:
    """A group's task in flight: when its worker started it (``None`` while it waits)."""

    group: int
    started: float | None = None


def _says_started(ref: Any) -> bool:
    """Whether a task's first item is ``STARTED`` (not an error: its node lost before it ran)."""
    try:
        return ray.get(ref) == STARTED
    except ray.exceptions.RayError:
        return False


def _failed(reason: str, photos: int, seconds: float) -> dict[str, Any]:
    return {"status": "failed", "reason": reason, "photos": photos, "seconds": seconds}


def _finished(ref: Any, photos: int, seconds: float) -> dict[str, Any] | None:
    """The group's result, or ``None`` when its node was lost before it ended."""
    try:
        result = ray.get(ref)
    except (ray.exceptions.NodeDiedError, ray.exceptions.LocalRayletDiedError):
        return None
    except ray.exceptions.WorkerCrashedError as err:
        reason = f"pycolmap crashed the worker (a segfault or abort): {str(err)[:300]}"
        return _failed(reason, photos, seconds)
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if err.cause is not None else err
        reason = f"{type(cause).__name__}: {str(cause).splitlines()[0][:300]}"
        return _failed(reason, photos, seconds)
    except ray.exceptions.RayError as err:
        return _failed(str(err)[:300], photos, seconds)
    result["phase_seconds"] = result.pop("seconds")
    result["status"] = "ok" if result["models"] else "failed"
    result["reason"] = None if result["models"] else "no model: too few verified matches"
    result["photos"] = photos
    result["seconds"] = seconds
    return result


def _store(out: str, group: int, status: dict[str, Any]) -> None:
    """The group's model files (a former result's models removed first), then its result
    (last: a result means the models are there)."""
    former = _read_json(_group_uri(out, group))
    storage.remove(_group_uri(out, group))
    for model in (former or {}).get("models", []):
        storage.remove(_model_uri(out, group, model["model"]))
    files = status.pop("files", {}) or {}
    for name, data in files.items():
        model, _, file = name.partition("/")
        storage.write_bytes(storage.join(_model_uri(out, group, model), file), data)
    log = status.pop("log", "")
    if log:
        storage.write_text(storage.join(out, "logs", f"{group:06d}.log"), log)
    storage.write_text(_group_uri(out, group), dumps_result(status))


def _model_uri(out: str, group: int, model: int | str) -> str:
    return storage.join(out, "models", f"{group}-{model}")


def _read_json(uri: str) -> dict[str, Any] | None:
    try:
        return loads_result(storage.read_text(uri))
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- the tables


def _assemble(
    conf: SfmConf,
    out: str,
    grouping: _Groups,
    *,
    statuses: dict[int, dict],
    reconstructed: list[int],
) -> dict[str, Any]:
    """Write the three tables from the groups' results; returns the manifest's details."""
    group_rows = _group_rows(grouping, statuses)
    model_rows = _model_rows(conf, statuses)
    image_rows = _image_rows(grouping, statuses)
    for spec, rows in (
        (tables.SFM_IMAGES, image_rows),
        (tables.SFM_MODELS, model_rows),
        (tables.SFM_GROUPS, group_rows),
    ):
        spec.write(out, spec.from_rows(rows))
    return {
        "photos": len(image_rows),
        "registered": sum(r["registered"] for r in image_rows),
        "attached": sum(r["attached"] for r in image_rows),
        "models": len(model_rows),
        "groups": {
            s: sum(g["status"] == s for g in group_rows) for s in ("ok", "failed", "skipped")
        },
        "failed": {g["group_id"]: g["reason"] for g in group_rows if g["status"] == "failed"},
        "reconstructed": sorted(reconstructed),
        "reused": sorted(
            g for g, s in statuses.items() if s["status"] != "skipped" and g not in reconstructed
        ),
    }


def _offered_to(grouping: _Groups, group: int, status: dict[str, Any]) -> list[str]:
    return grouping.offered.get(group, []) if status["status"] != "skipped" else []


def _group_rows(grouping: _Groups, statuses: dict[int, dict]) -> list[dict[str, Any]]:
    """One row per group: its photos, offers, status, reason and time."""
    return [
        {
            "group_id": group,
            "photos": status.get("photos", 0),
            "offered": len(_offered_to(grouping, group, status)),
            "status": status["status"],
            "reason": status.get("reason"),
            "seconds": float(status.get("seconds") or 0.0),
        }
        for group, status in sorted(statuses.items())
    ]


def _model_rows(conf: SfmConf, statuses: dict[int, dict]) -> list[dict[str, Any]]:
    """One row per model of every group."""
    return [
        {
            "model_id": f"{group}-{m['model']}",
            "group_id": group,
            "images": m["images"],
            "points": m["points"],
            "mean_reprojection_error": m["mean_reprojection_error"],
            "mean_track_length": m["mean_track_length"],
            "mapper": conf.mapper,
            "seconds": float(status.get("seconds") or 0.0),
        }
        for group, status in sorted(statuses.items())
        for m in status.get("models", [])
    ]


def _image_rows(grouping: _Groups, statuses: dict[int, dict]) -> list[dict[str, Any]]:
    """One row per grouped photo: the best of the rows its groups gave it (``_best_row``)."""
    rows_of: dict[str, list[dict[str, Any]]] = {}
    for group, status in sorted(statuses.items()):
        extra = _offered_to(grouping, group, status)
        by_id = {r["image_id"]: r for r in status.get("images", [])}
        model_size = {m["model"]: m["images"] for m in status.get("models", [])}
        for image_id in grouping.members[group] + extra:
            row = _image_row(group, by_id.get(image_id, {}), image_id, offered=image_id in extra)
            size = model_size.get(by_id.get(image_id, {}).get("model"), 0)
            row["_model_size"] = size if row["registered"] else 0
            rows_of.setdefault(image_id, []).append(row)
    return [_best_row(rows) for rows in rows_of.values()]


def _image_row(group: int, r: dict[str, Any], image_id: str, *, offered: bool) -> dict[str, Any]:
    """A photo's row as one group's reconstruction gave it (``r``: its ``ImageRow``)."""
    registered = bool(r.get("registered"))
    centre = r.get("centre") or (None, None, None)
    return {
        "image_id": image_id,
        "group_id": group,
        "attached": registered and offered,
        "model_id": f"{group}-{r['model']}" if registered else None,
        "registered": registered,
        "cluster_id": group if group >= 0 else None,
        "centre_x": centre[0],
        "centre_y": centre[1],
        "centre_z": centre[2],
        "point3d_ids": np.asarray(r.get("point_ids", ()) if registered else (), dtype=np.int64),
        "scale": r.get("scale"),
        "observations": int(r.get("observations", 0)),
        "_own": not offered,
    }


def _best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A photo's row: the largest model that registers it (its own group's on a tie), else its
    own group's."""
    best = max(rows, key=lambda r: (r["registered"], r["_model_size"], r["_own"]))
    if not best["registered"]:
        best = next(r for r in rows if r["_own"])
    return {k: v for k, v in best.items() if not k.startswith("_")}


def _log(details: dict[str, Any]) -> None:
    failed = details["failed"]
    logger.info(
        "sfm: %d of %d photos registered (%d of them leftovers attached) in %d models; groups %s "
        "(%d reconstructed, %d reused)%s",
        details["registered"],
        details["photos"],
        details["attached"],
        details["models"],
        details["groups"],
        len(details["reconstructed"]),
        len(details["reused"]),
        "; failed: " + "; ".join(f"{g}: {r}" for g, r in failed.items()) if failed else "",
    )
