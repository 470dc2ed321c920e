"""The storage layer on local paths and on the loopback S3 server, through the same calls."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from model import storage


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path: Path) -> str:
    """A folder URI that does not exist yet: a local path, or a prefix in a fresh S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/store"


def test_write_read_list_remove(base: str) -> None:
    assert not storage.exists(base)
    storage.write_bytes(storage.join(base, "a", "x.bin"), b"\x00\x01")
    storage.write_text(storage.join(base, "b.txt"), "héllo")
    assert storage.read_bytes(storage.join(base, "a/x.bin")) == b"\x00\x01"
    assert storage.read_text(storage.join(base, "b.txt")) == "héllo"
    assert storage.is_file(storage.join(base, "b.txt")) and storage.exists(base)
    files = storage.list_files(base)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["x.bin", "b.txt"]
    assert storage.list_files(base, suffixes=(".TXT",)) == [storage.join(base, "b.txt")]
    assert storage.list_files(base, recursive=False) == [storage.join(base, "b.txt")]
    storage.write_bytes(storage.join(base, "b.txt"), b"new")  # replaced whole
    assert storage.read_bytes(storage.join(base, "b.txt")) == b"new"
    storage.remove(storage.join(base, "a"))
    assert storage.list_files(base) == [storage.join(base, "b.txt")]
    storage.remove(base)
    assert not storage.exists(base)
    with pytest.raises(FileNotFoundError, match="no file at"):
        storage.read_bytes(storage.join(base, "b.txt"))
    with pytest.raises(FileNotFoundError, match="no folder at"):
        storage.list_files(base)


def test_publish_directory_appears_whole_or_not_at_all(base: str) -> None:
    target = storage.join(base, "result")
    with storage.publish_directory(target, last="marker") as staging:
        (staging / "marker").write_text("v1")
        (staging / "part-0.bin").write_bytes(b"one")
        (staging / "sub").mkdir()
        (staging / "sub" / "part-1.bin").write_bytes(b"two")
        assert not storage.exists(target)  # nothing visible before the block ends
    assert storage.read_text(storage.join(target, "marker")) == "v1"
    assert storage.read_bytes(storage.join(target, "sub/part-1.bin")) == b"two"

    # A failed rewrite leaves v1 as it was.
    with (
        pytest.raises(RuntimeError, match="crash"),
        storage.publish_directory(target, last="marker") as staging,
    ):
        (staging / "part-0.bin").write_bytes(b"half")
        raise RuntimeError("crash")
    assert storage.read_bytes(storage.join(target, "part-0.bin")) == b"one"
    assert storage.read_text(storage.join(target, "marker")) == "v1"

    with storage.publish_directory(target, last="marker") as staging:  # a rewrite replaces
        (staging / "only.bin").write_bytes(b"three")
        (staging / "marker").write_text("v3")
    names = sorted(f.rsplit("/", 1)[-1] for f in storage.list_files(target))
    assert names == ["marker", "only.bin"]


def test_local_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    storage.write_bytes(tmp_path / "deep" / "f.json", b"{}")
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["f.json"]


def test_stage_to_local_copies_a_prefix_once(s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/photos"
    storage.write_bytes(f"{uri}/a.jpg", b"A")
    storage.write_bytes(f"{uri}/sub/b.jpg", b"B")
    local = storage.stage_to_local(uri, tmp_path / "cache")
    assert (local / "a.jpg").read_bytes() == b"A" and (local / "sub" / "b.jpg").read_bytes() == b"B"
    storage.write_bytes(f"{uri}/c.jpg", b"C")
    assert storage.stage_to_local(uri, tmp_path / "cache") == local  # complete: reused
    with pytest.raises(FileNotFoundError, match="nothing at"):
        storage.stage_to_local(f"s3://{s3_bucket}/absent", tmp_path / "cache")


def test_signature_changes_with_the_file(base: str) -> None:
    uri = storage.join(base, "f.bin")
    storage.write_bytes(uri, b"1")
    first = storage.file_signature(uri)
    storage.write_bytes(uri, b"22")
    assert storage.file_signature(uri) != first


def test_one_s3_filesystem_per_bucket_shared_by_threads(s3_bucket: str) -> None:
    """Making an S3 filesystem resolves credentials and region: once per bucket per process,
    not per call (ingest reads a photo per call from many threads)."""
    uris = [f"s3://{s3_bucket}/photos/{i}.jpg" for i in range(32)]
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(storage.arrow_filesystem, uris))
    assert len({id(filesystem) for filesystem, _ in found}) == 1
    assert [path for _, path in found] == [f"{s3_bucket}/photos/{i}.jpg" for i in range(32)]
    assert storage.arrow_filesystem(f"s3://{s3_bucket}/")[1] == s3_bucket
    storage.write_text(f"s3://{s3_bucket}/a/b.txt", "shared")
    assert storage.read_text(f"s3://{s3_bucket}/a/b.txt") == "shared"
    other = f"{s3_bucket}-other"
    assert storage.arrow_filesystem(f"s3://{other}/x")[0] is not found[0][0]
