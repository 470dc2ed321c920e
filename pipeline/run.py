"""The whole chain as one command: photos in, a fine-tuned index (and its search service) out.

    python -m pipeline.run --source PHOTOS --output RUN [--config FILE] [--serve]

Each stage writes under ``RUN`` with a fixed name and reads the one before's output, so
nothing is typed twice:

    RUN/
      images.parquet/        ingest: the photos' bytes and what failed, with reasons
      descriptors/           extract with the off-the-shelf network
      groups/                group: photos of one scene together
      sfm/                   sfm: a 3D model per group
      pairs/                 pairs: training tuples from the models
      train/                 train: the fine-tuned network, its Lw, curves
      descriptors-trained/   extract with the fine-tuned network
      index/                 index of the fine-tuned descriptors (the off-the-shelf ones when
                             the photos gave nothing to train on)
      run.json               what each stage did, in how many seconds
      report.html, report/   the run report: a page of what each stage found, with pictures

Every stage resumes by its inputs' and settings' fingerprints, so the same command again
finishes in seconds. With photos added the run keeps the network it trained (training again is
hours of work for a few photos; ``--retrain`` asks for it) and describes and indexes only the new
photos. ``--local-features`` adds the features stage (SIFT of every photo, pinned into the
index) so that the service re-ranks by spatial verification. ``--config``
gives each stage's flags by stage (``extract: {max_size: 512}``; ``configs/`` holds a laptop
and a cluster example); ``--print-config`` writes the whole resolved config. On a cluster the
same command is one ``ray job submit`` with ``RUN`` on S3.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

import tyro
import yaml

from cluster import index_store
from model import storage, tables
from model.cli import USER_ERRORS, flat_settings, run_cli
from pipeline import extract, features, group, index, ingest, pairs, report, serve, sfm, train

logger = logging.getLogger("pipeline.run")

__all__ = ["STAGES", "RunConf", "layout", "resolved_config", "run"]

Stage = Literal[
    "ingest", "extract", "group", "sfm", "pairs", "train", "extract-trained", "features", "index"
]
STAGES: tuple[str, ...] = get_args(Stage)

LAYOUT = tables.RUN_LAYOUT
"""Where each stage writes under the run folder."""

CONFIG_SECTIONS = (
    "ingest",
    "extract",
    "group",
    "sfm",
    "pairs",
    "train",
    "features",
    "index",
    "report",
    "serve",
)
"""The config file's sections: a stage's flags by their names (both extracts share one)."""

WIRED = {
    "ingest": {"source", "output"},
    "extract": {"images", "output", "weights"},
    "group": {"images", "descriptors", "output"},
    "sfm": {"images", "groups", "output"},
    "pairs": {"sfm", "output"},
    "train": {"images", "pairs", "output"},
    "features": {"images", "output"},
    "index": {"descriptors", "output", "local_features"},
    "report": {"run"},
    "serve": {"index"},
}
"""Flags the run sets itself from the run folder; a config may not set them."""


@dataclass
class RunConf:
    """Photos to a served, self-trained index in one command."""

    source: str
    """The photos: a folder (a sub-folder per scene, if known), a CSV/Parquet manifest of
    paths or URLs, or an ``s3://`` prefix."""
    output: str
    """The run folder (local, or ``s3://`` on a cluster): every stage's output lies under it."""
    config: str | None = None
    """A YAML file of stage flags by stage: ``{extract: {max_size: 512}, train: {epochs: 5}}``."""
    until: Stage | None = None
    """Stop after this stage."""
    from_stage: Annotated[Stage | None, tyro.conf.arg(aliases=("--from",))] = None
    """Start at this stage (``--from``); the stages before it must be complete in the run
    folder."""
    serve: bool = False
    """Keep the search service up on the index at the end."""
    local_features: bool = False
    """Also extract every photo's local features (pipeline.features) and pin them into the
    index, so that the service re-ranks by spatial verification (POST /search?rerank=K)."""
    retrain: bool = False
    """Train again when the photos have changed since this run folder's network was trained
    (without it, added photos are described and indexed with that network)."""
    print_config: bool = False
    """Print the whole resolved config (every stage's every flag) as YAML and stop."""


@dataclass
class _Step:
    """One stage of the chain: its config type, its run function and where it writes."""

    section: str
    conf_type: type
    run: Callable[[Any], str]


def _steps() -> dict[str, _Step]:
    """Each stage's config type and run function."""
    return {
        "ingest": _Step("ingest", ingest.IngestConf, ingest.run),
        "extract": _Step("extract", extract.ExtractConf, extract.run),
        "group": _Step("group", group.GroupConf, group.run),
        "sfm": _Step("sfm", sfm.SfmConf, sfm.run),
        "pairs": _Step("pairs", pairs.PairsConf, pairs.run),
        "train": _Step("train", train.TrainConf, train.run),
        "extract-trained": _Step("extract", extract.ExtractConf, extract.run),
        "features": _Step("features", features.FeaturesConf, features.run),
        "index": _Step("index", index.IndexConf, index.run),
        "report": _Step("report", report.ReportConf, report.run),
        "serve": _Step("serve", serve.ServeConf, serve.run),
    }


def layout(run_folder: str) -> dict[str, str]:
    """Each stage's output URI under ``run_folder``."""
    return {stage: storage.join(run_folder, name) for stage, name in LAYOUT.items()}


def setting_types(conf_type: type) -> dict[str, Any]:
    """Every flag of a stage's config by name, with its type (a part's fields flattened)."""
    hints = typing.get_type_hints(conf_type)
    found: dict[str, Any] = {}
    for field in dataclasses.fields(conf_type):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            found.update(setting_types(hint))
        else:
            found[field.name] = hint
    return found


def read_config(path: str | None, steps: dict[str, _Step]) -> dict[str, dict[str, Any]]:
    """The config file's sections, every key checked against its stage's flags and their
    types; ``ValueError`` with one line per problem, naming the nearest valid key."""
    if path is None:
        return {}
    try:
        loaded = yaml.safe_load(storage.read_text(path)) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"--config: {path} is not YAML: {' '.join(str(err).split())}") from err
    if not isinstance(loaded, dict):
        raise ValueError(f"--config: {path} must map stages to their flags")
    types_of = {
        s.section: setting_types(s.conf_type) for s in steps.values() if s.section in loaded
    }
    problems = []
    for section, flags in loaded.items():
        if section not in CONFIG_SECTIONS:
            problems.append(f"--config: no stage {section!r}{_nearest(section, CONFIG_SECTIONS)}")
            continue
        if not isinstance(flags, dict):
            problems.append(f"--config: {section} must map flags to values")
            continue
        for key, value in flags.items():
            name = str(key).replace("-", "_")
            known = types_of[section]
            if name in WIRED[section]:
                problems.append(f"--config: {section}.{key} is set by the run from its folder")
            elif name not in known:
                problems.append(
                    f"--config: {section} has no flag {key!r}{_nearest(name, list(known))}"
                )
            elif not _fits(value, known[name]):
                problems.append(
                    f"--config: {section}.{key} must be {_type_name(known[name])}, not {value!r}"
                )
    if problems:
        raise ValueError("\n".join(problems))
    return {
        section: {k.replace("-", "_"): v for k, v in f.items()} for section, f in loaded.items()
    }


def _nearest(name: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value suits a flag's type (ints where floats go, lists for tuples)."""
    origin = get_origin(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (tuple, list):
        args = [a for a in get_args(hint) if a is not Ellipsis]
        return isinstance(value, list | tuple) and all(_fits(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def resolved_config(conf: RunConf, steps: dict[str, _Step] | None = None) -> dict[str, Any]:
    """Every stage's every flag as this run sets it: the config's, else the stage's default,
    and the paths the run wires between stages."""
    steps = steps or _steps()
    sections = read_config(conf.config, steps)
    wired = _wiring(conf, trained=True)
    resolved: dict[str, Any] = {}
    for stage, step in steps.items():
        if stage == "extract-trained" or (stage == "serve" and not conf.serve):
            continue
        made = _made(step, {**sections.get(step.section, {}), **wired[stage]})
        resolved[step.section] = _plain(flat_settings(made))
    return resolved


def _wiring(conf: RunConf, *, trained: bool) -> dict[str, dict[str, Any]]:
    """The paths each stage gets from the run folder (the index reads the off-the-shelf
    descriptors when nothing was trained)."""
    out = layout(conf.output)
    described = out["extract-trained"] if trained else out["extract"]
    return {
        "ingest": {"source": conf.source, "output": conf.output},
        "extract": {"images": out["ingest"], "output": out["extract"]},
        "group": {"images": out["ingest"], "descriptors": out["extract"], "output": out["group"]},
        "sfm": {"images": out["ingest"], "groups": out["group"], "output": out["sfm"]},
        "pairs": {"sfm": out["sfm"], "output": out["pairs"]},
        "train": {"images": out["ingest"], "pairs": out["pairs"], "output": out["train"]},
        "extract-trained": {
            "images": out["ingest"],
            "output": out["extract-trained"],
            "weights": out["train"],
        },
        "features": {"images": out["ingest"], "output": out["features"]},
        "index": {
            "descriptors": described,
            "output": out["index"],
            "local_features": out["features"] if conf.local_features else None,
        },
        "report": {"run": conf.output},
        "serve": {"index": out["index"]},
    }


def _made(step: _Step, flags: dict[str, Any]) -> Any:
    """A stage's config from flags by name (a part's fields flat, as its command line takes
    them)."""
    from_flags = getattr(step.conf_type, "from_flags", None)
    if from_flags is not None:
        return from_flags(**flags)
    return step.conf_type(**flags)


def _plain(settings: dict[str, Any]) -> dict[str, Any]:
    """YAML-writable values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def run(conf: RunConf) -> str:
    """Run the chain into ``conf.output``; returns the index's URI (the search URL with
    ``--serve``)."""
    steps = _steps()
    if conf.print_config:
        print(yaml.safe_dump(resolved_config(conf, steps), sort_keys=False), end="")
        return conf.output
    sections = read_config(conf.config, steps)
    out = layout(conf.output)
    first = STAGES.index(conf.from_stage) if conf.from_stage else 0
    last = STAGES.index(conf.until) if conf.until else len(STAGES) - 1
    if first > last:
        raise ValueError(f"--from-stage {conf.from_stage} comes after --until {conf.until}")
    _check_earlier_stages(out, STAGES[:first])
    earlier = _check_same_run(conf)
    summary: dict[str, Any] = {"source": conf.source, "output": conf.output, "stages": {}}
    trained, kept = True, False
    for stage in STAGES[first : last + 1]:
        if stage in ("train", "extract-trained") and not trained:
            continue
        if stage == "features" and not conf.local_features:
            summary["stages"][stage] = {"skipped": "no --local-features"}
            continue
        if kept and stage in _TRAINING_ONLY:
            summary["stages"][stage] = {"skipped": _KEPT}
            continue
        if stage == "train" and not _has_pairs(out["pairs"]):
            trained = False
            logger.warning(
                "the photos gave no training pairs (no 3D model with enough photos): "
                "skipping training; the index holds the off-the-shelf descriptors"
            )
            summary["stages"]["train"] = {"skipped": "no training pairs"}
            continue
        step = steps[stage]
        flags = {**sections.get(step.section, {}), **_wiring(conf, trained=trained)[stage]}
        before = _identity(stage, out[stage])
        done = _run_stage(stage, step, flags, resumable=bool(summary["stages"]))
        if before is not None and before == _identity(stage, out[stage]) and stage in earlier:
            done = {**earlier[stage], "reused": True}  # what the run that made it did
        summary["stages"][stage] = done
        _write_summary(conf.output, summary)
        if stage == "ingest":
            _check_usable(conf, summary["stages"]["ingest"])
            kept = _keeps_network(conf, steps["train"], sections.get("train", {}))
    serving = conf.serve and last == len(STAGES) - 1
    if serving:
        serve = steps["serve"]
        flags = {**sections.get("serve", {}), **_wiring(conf, trained=trained)["serve"]}
        serve_conf = _made(serve, flags)
        summary["search"] = f"http://{serve_conf.host}:{serve_conf.port}"
        _write_summary(conf.output, summary)
    summary["report"] = _report(conf, steps["report"], sections.get("report", {}))
    _write_summary(conf.output, summary)
    _log_summary(summary)
    if not serving:
        return out["index"]
    # Blocks, serving, until interrupted (the local Ray ends with this process), unless the
    # config's serve section says detach: true, as on a cluster that outlives the job.
    return serve.run(serve_conf)


_TRAINING_ONLY = ("extract", "group", "sfm", "pairs", "train")
"""The stages that only lead to the fine-tuned network."""
_KEPT = "photos changed since the network was trained; kept it (--retrain trains again)"


def _keeps_network(conf: RunConf, step: _Step, flags: dict[str, Any]) -> bool:
    """Whether the photos changed since this run folder's network was trained, with the
    training settings as they are now: then the run keeps that network and only describes and
    indexes the new photos, unless ``--retrain``."""
    out = layout(conf.output)
    trained = tables.TRAIN_OUTPUT.existing(out["train"])
    if conf.retrain or trained is None:
        return False
    photos = tables.IMAGES_OUTPUT.manifest(out["ingest"]).identity
    if trained.inputs.get("images") == photos:
        return False  # the same photos: every stage finds its output complete
    settings = _made(step, {**flags, **_wiring(conf, trained=True)["train"]}).content_settings()
    if trained.changed_settings(settings):
        return False  # the train stage itself says what changed
    logger.info(
        "the photos changed since %s was trained: keeping that network, describing and "
        "indexing only the new photos (--retrain trains again on all of them)",
        out["train"],
    )
    return True


def _report(conf: RunConf, step: _Step, flags: dict[str, Any]) -> str | None:
    """The run report over whatever the run folder holds; a report that cannot be written is
    a warning, not a failed run (every stage's output is complete by then)."""
    try:
        return step.run(_made(step, {**flags, **_wiring(conf, trained=True)["report"]}))
    except Exception as err:  # the outputs stand; the page is only a view of them
        logger.warning("the run report could not be written: %s", err)
        return None


def _check_earlier_stages(out: dict[str, str], stages: tuple[str, ...]) -> None:
    """``--from-stage`` needs the stages before it complete in the run folder."""
    read_later = ("ingest", "extract", "sfm", "pairs", "extract-trained")
    missing = [
        f"{stage} ({out[stage]})"
        for stage in stages
        if stage in read_later and not _spec(stage).is_complete(out[stage])
    ]
    if missing:
        raise ValueError(f"--from-stage: not complete in the run folder: {', '.join(missing)}")


def _check_same_run(conf: RunConf) -> dict[str, Any]:
    """A run folder holds one collection's run: another ``--source`` there is refused.
    Returns what the earlier runs' stages did, by stage."""
    summary = storage.join(conf.output, tables.RUN_SUMMARY)
    if not storage.exists(summary):
        return {}
    earlier = json.loads(storage.read_text(summary))
    if earlier.get("source") != conf.source:
        raise ValueError(
            f"--output: {conf.output} holds the run of {earlier.get('source')}, not of "
            f"{conf.source}; give another run folder (or the same --source)"
        )
    return {k: v for k, v in earlier.get("stages", {}).items() if "skipped" not in v}


def _identity(stage: str, uri: str) -> str | None:
    """The identity of the complete output a stage has at ``uri`` (the index: its newest
    version's), ``None`` when there is none; the same before and after a stage means the stage
    found its work done."""
    if stage == "index":
        version = index_store.latest_version(uri)
        return None if version is None else index_store.version_manifest(uri, version).identity
    manifest = _spec(stage).existing(uri)
    return None if manifest is None else manifest.identity


def _has_pairs(pairs: str) -> bool:
    return tables.PAIRS.read(pairs, ["query_id"]).num_rows > 0


def _run_stage(
    stage: str, step: _Step, flags: dict[str, Any], *, resumable: bool
) -> dict[str, Any]:
    """Run one stage; what it did and how long it took. A failure names the stage and, when
    stages finished before it, how to go on from it."""
    logger.info("── %s", stage)
    started = time.monotonic()
    how = f"what finished stays; run the same command again, or add --from-stage {stage}"
    try:
        output = step.run(_made(step, flags))
    except USER_ERRORS as err:
        raise ValueError(f"stage {stage}: {err}" + (f" ({how})" if resumable else "")) from err
    except Exception:
        logger.error("stage %s failed (%s)", stage, how)
        raise
    seconds = time.monotonic() - started
    return {"output": output, **_details(stage, output), "seconds": round(seconds, 1)}


def _check_usable(conf: RunConf, ingested: dict[str, Any]) -> None:
    """A source none of whose photos could be read stops the run after ingest, saying why."""
    if ingested.get("ingested", 1) > 0:
        return
    failed = ingested.get("failed") or {}
    why = ", ".join(f"{count} {kind}" for kind, count in failed.items()) or "no photos"
    raise ValueError(
        f"--source {conf.source}: none of its photos could be read ({why}); each photo's "
        f"reason is in {ingested['output']} (column error)"
    )


def _spec(stage: str) -> tables.Output:
    """The table spec of a stage's output (both extracts write descriptors)."""
    return tables.OUTPUTS[stage.removesuffix("-trained")]


def _details(stage: str, output: str) -> dict[str, Any]:
    """The counts a stage's manifest states (photos, failures, models, pairs, index size)."""
    spec = _spec(stage)
    if not spec.is_complete(output):
        return {}
    return {k: v for k, v in spec.manifest(output).details.items() if _brief(v)}


def _brief(value: Any) -> bool:
    """A count, or a short table of counts or reasons, not a list of every photo."""
    if isinstance(value, dict):
        return len(value) <= 12 and all(isinstance(v, int | float | str) for v in value.values())
    return isinstance(value, int | float | str)


def _write_summary(run_folder: str, summary: dict[str, Any]) -> None:
    storage.write_text(storage.join(run_folder, tables.RUN_SUMMARY), json.dumps(summary, indent=1))


def _log_summary(summary: dict[str, Any]) -> None:
    lines = ["run summary:"]
    for stage, done in summary["stages"].items():
        if "skipped" in done:
            lines.append(f"  {stage:16s} skipped: {done['skipped']}")
        else:
            made = "  (done before)" if done.get("reused") else ""
            lines.append(
                f"  {stage:16s} {done['seconds']:7.1f} s  {report.stage_counts(stage, done)}{made}"
            )
    lines.append(f"  outputs under {summary['output']}")
    lines.append(f"  summary: {storage.join(summary['output'], tables.RUN_SUMMARY)}")
    if summary.get("report"):
        lines.append(f"  report: {summary['report']}")
    if "search" in summary:
        lines.append(f"  search page: {summary['search']}")
    logger.info("\n".join(lines))


if __name__ == "__main__":
    run_cli(run, RunConf)
