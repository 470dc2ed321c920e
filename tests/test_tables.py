"""The table specs: one marker, reading by folder or file, fingerprints, resume decisions."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from model import storage, tables
from model.tables import GROUPS, GROUPS_OUTPUT, IMAGES, IMAGES_OUTPUT, PAIRS_OUTPUT, OutputChanged


def _groups(n: int = 4) -> pa.Table:
    return pa.table({"image_id": [f"i{k}" for k in range(n)], "group_id": list(range(n))})


def _publish_groups(out: str, settings: dict, inputs: dict | None = None) -> tables.Manifest:
    GROUPS.write(out, _groups())
    return GROUPS_OUTPUT.publish(out, inputs=inputs or {"descriptors": "d1"}, settings=settings)


def test_an_output_is_complete_only_once_its_manifest_is_written(tmp_path):
    out = str(tmp_path / "groups")
    GROUPS.write(out, _groups())
    assert not GROUPS_OUTPUT.is_complete(out)
    with pytest.raises(ValueError, match="not a complete group output"):
        GROUPS.read(out)
    manifest = GROUPS_OUTPUT.publish(out, inputs={"descriptors": "d1"}, settings={"k": 10})
    assert GROUPS_OUTPUT.is_complete(out)
    assert manifest.rows == {"groups": 4}
    assert manifest.files == {"groups": ["groups.parquet"]}
    # the folder or the table's own file, alike
    assert GROUPS.read(out).equals(GROUPS.read(f"{out}/groups.parquet"))
    assert GROUPS.read(out, ["group_id"]).column_names == ["group_id"]
    # an optional table the output lacks reads as empty, with its schema
    assert tables.CANDIDATES.read(out).num_rows == 0


def test_reading_projects_filters_and_names_missing_outputs(tmp_path):
    out = str(tmp_path / "groups")
    _publish_groups(out, {"k": 10})
    picked = GROUPS.read(out, ["image_id"], filter=pads.field("group_id") >= 2)
    assert picked["image_id"].to_pylist() == ["i2", "i3"]
    with pytest.raises(FileNotFoundError, match=r"no group output at .*run pipeline.group first"):
        GROUPS.read(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="no column"):
        GROUPS.read(out, ["nope"])
    with pytest.raises(ValueError, match="is a group output, not a pairs output"):
        PAIRS_OUTPUT.manifest(out)


def test_a_table_of_another_schema_is_refused_with_its_columns_named(tmp_path):
    with pytest.raises(ValueError, match=r"missing column.*group_id"):
        GROUPS.write(str(tmp_path), pa.table({"image_id": ["a"]}))
    with pytest.raises(ValueError, match="group_id is string"):
        GROUPS.write(str(tmp_path), pa.table({"image_id": ["a"], "group_id": ["x"]}))


def test_parts_are_read_as_one_table_and_only_listed_parts_count(tmp_path):
    images = IMAGES_OUTPUT.locate(str(tmp_path / "run"))
    assert images.endswith("/run/images.parquet")
    rows = [{"uri": f"u{k}", "image_id": f"i{k}", "error": None} for k in range(6)]
    for k in range(3):
        IMAGES.write(
            images, pa.Table.from_pylist(rows[2 * k : 2 * k + 2], IMAGES.schema), f"part-{k}"
        )
    manifest = IMAGES_OUTPUT.publish(str(tmp_path / "run"), settings={})
    assert manifest.rows == {"images": 6}
    # a part an interrupted later run left behind is not part of the published table
    IMAGES.write(images, pa.Table.from_pylist(rows[:1], IMAGES.schema), "part-9")
    assert IMAGES.read(str(tmp_path / "run"), ["uri"]).num_rows == 6
    # ... but a resume sees every readable part, and names the unreadable ones
    (tmp_path / "run" / "images.parquet" / "part-broken.parquet").write_bytes(b"not parquet")
    found, bad = IMAGES.read_unpublished(images, ["uri"])
    assert found.num_rows == 7
    assert len(bad) == 1 and "part-broken.parquet" in bad[0]


def test_fingerprints_follow_inputs_and_settings_identities_follow_content(tmp_path):
    a = _publish_groups(str(tmp_path / "a"), {"k": 10})
    b = _publish_groups(str(tmp_path / "b"), {"k": 10})
    assert a.fingerprint == b.fingerprint and a.identity == b.identity
    c = _publish_groups(str(tmp_path / "c"), {"k": 11})
    d = _publish_groups(str(tmp_path / "d"), {"k": 10}, inputs={"descriptors": "d2"})
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3
    GROUPS.write(str(tmp_path / "e"), _groups(5))
    e = GROUPS_OUTPUT.publish(str(tmp_path / "e"), inputs={"descriptors": "d1"}, settings={"k": 10})
    assert e.fingerprint == a.fingerprint and e.identity != a.identity


def test_plan_skips_updates_or_names_what_changed(tmp_path):
    out = str(tmp_path / "g")
    assert GROUPS_OUTPUT.plan(out, {"descriptors": "d1"}, {"k": 10}) == ("new", None)
    made = _publish_groups(out, {"k": 10, "threshold": 0.5})
    settings = {"k": 10, "threshold": 0.5}
    assert GROUPS_OUTPUT.plan(out, {"descriptors": "d1"}, settings) == ("skip", made)
    assert GROUPS_OUTPUT.plan(out, {"descriptors": "d2"}, settings)[0] == "update"
    with pytest.raises(OutputChanged) as caught:
        GROUPS_OUTPUT.plan(out, {"descriptors": "d1"}, {"k": 12, "threshold": 0.5})
    message = str(caught.value)
    assert "k: 10 → 12" in message and "--overwrite" in message and "\n" not in message
    assert GROUPS_OUTPUT.plan(out, {}, {"k": 12}, overwrite=True) == ("new", None)


def test_an_unfinished_output_is_redone_and_a_foreign_manifest_refused(tmp_path):
    out = tmp_path / "g"
    GROUPS.write(str(out), _groups())
    assert GROUPS_OUTPUT.plan(str(out), {}, {}) == ("new", None)
    (out / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a manifest of this version"):
        GROUPS_OUTPUT.plan(str(out), {}, {})
    assert GROUPS_OUTPUT.plan(str(out), {}, {}, overwrite=True) == ("new", None)


def test_sources_are_stored_resolved_and_found_again_after_a_move(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    upstream = _publish_groups("run/groups", {"k": 10})
    GROUPS.write("run/later", _groups())
    later = GROUPS_OUTPUT.publish("run/later", inputs={"groups": upstream}, settings={})
    stored = later.sources["groups"]
    assert stored["uri"] == str((tmp_path / "run" / "groups").resolve())
    assert stored["relative"] == "../groups"
    (tmp_path / "run").rename(tmp_path / "moved")
    moved = GROUPS_OUTPUT.manifest(str(tmp_path / "moved" / "later"))
    assert moved.source("groups") == str(tmp_path / "moved" / "groups")
    assert GROUPS.read(moved.source("groups")).num_rows == 4


def test_outputs_on_s3_publish_and_read_alike(s3_bucket):
    out = f"s3://{s3_bucket}/run/groups"
    made = _publish_groups(out, {"k": 10})
    assert storage.is_file(f"{out}/manifest.json")
    assert GROUPS_OUTPUT.manifest(out).identity == made.identity
    assert GROUPS.read(f"{out}/groups.parquet", ["image_id"]).num_rows == 4
    assert made.code == tables.code_version()
