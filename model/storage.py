"""The one storage layer: local paths and ``s3://`` URIs alike, through ``pyarrow.fs``.

Every stage, and the model library for weights and whitening, reads and writes through these
functions, so nothing else needs to know where a file lives. S3 settings come from the usual
AWS variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``, credentials), so the same call reaches AWS
or a local S3 server. Nothing here imports torch: SfM workers, which must never import torch,
use this module too.

Publishing never leaves a half-written result that looks whole:

- ``write_bytes`` writes one file: locally to a temporary name in the same folder, then renamed;
  on an object store one PUT, which appears whole or not at all.
- ``publish_directory`` stages a whole folder locally; locally it is renamed into place whole,
  on an object store its files are uploaded first and its marker (the file named ``last``)
  after them, so a reader that waits for the marker only ever sees complete folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pyarrow import fs as pafs

__all__ = [
    "AWS_SETTINGS",
    "arrow_filesystem",
    "bucket_problem",
    "exists",
    "file_signature",
    "is_file",
    "is_remote",
    "join",
    "list_files",
    "local_path",
    "publish_directory",
    "read_bytes",
    "read_text",
    "remove",
    "stage_to_local",
    "write_bytes",
    "write_text",
]

logger = logging.getLogger(__name__)

_STAGED = ".staged"


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for ``scheme://`` URIs other than ``file://``."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def local_path(uri: str | os.PathLike[str]) -> Path:
    """The local path a non-remote URI names (``file://`` stripped, ``~`` expanded)."""
    if is_remote(uri):
        raise ValueError(f"{uri} is not a local path")
    return Path(str(uri).removeprefix("file://")).expanduser()


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """``base/part/...`` for a path or a URI, without doubling slashes."""
    text = str(base).rstrip("/") if str(base) not in ("/", "") else str(base)
    for part in parts:
        text = f"{text.rstrip('/')}/{str(part).strip('/')}"
    return text


AWS_SETTINGS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
)
_filesystems: dict[tuple[str, ...], Any] = {}
_filesystems_lock = threading.Lock()


def _remote(uri: str) -> tuple[Any, str]:
    """``(filesystem, path)`` of a remote URI; one filesystem per bucket per process.

    Making one resolves credentials and the bucket's region (network calls), so it is made
    once and shared by every call and thread; the AWS settings are part of the key, so a
    changed endpoint or profile gets a filesystem of its own.
    """
    scheme, _, rest = uri.partition("://")
    if "?" in rest:  # options in the URI: a filesystem of their own, never shared
        return _from_uri(uri)
    bucket, _, key = rest.partition("/")
    settings = (os.environ.get(name, "") for name in AWS_SETTINGS)
    cache_key = (scheme, bucket, str(os.getpid()), *settings)  # a forked child makes its own
    with _filesystems_lock:
        filesystem = _filesystems.get(cache_key)
    if filesystem is None:
        filesystem, _ = _from_uri(f"{scheme}://{bucket}")
        with _filesystems_lock:
            filesystem = _filesystems.setdefault(cache_key, filesystem)
    path = f"{bucket}/{key}".rstrip("/") if key.strip("/") else bucket
    return filesystem, path


def _from_uri(uri: str) -> tuple[Any, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot open {uri!r}: {err}") from err


def arrow_filesystem(uri: str | os.PathLike[str]) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path)`` for ``uri``: for readers that want random access (the
    columns of a Parquet file, a Parquet dataset) rather than whole files."""
    text = str(uri)
    if is_remote(text):
        return _remote(text)
    return pafs.LocalFileSystem(), str(local_path(text))


def _kind(uri: str) -> str:
    """``"file"``, ``"dir"`` or ``"none"``."""
    if not is_remote(uri):
        local = local_path(uri)
        return "file" if local.is_file() else "dir" if local.is_dir() else "none"
    filesystem, path = _remote(uri)
    info = filesystem.get_file_info(path)
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(info.type, "none")


def exists(uri: str | os.PathLike[str]) -> bool:
    """Whether a file or a folder (for S3: any object under the prefix) is at ``uri``."""
    return _kind(str(uri)) != "none"


def is_file(uri: str | os.PathLike[str]) -> bool:
    return _kind(str(uri)) == "file"


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    """The whole content of ``uri``; ``FileNotFoundError`` naming it when there is nothing there."""
    text = str(uri)
    if not is_remote(text):
        local = local_path(text)
        if not local.is_file():
            raise FileNotFoundError(f"no file at {local}")
        return local.read_bytes()
    filesystem, path = _remote(text)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"no file at {text}")
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def read_text(uri: str | os.PathLike[str]) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str | os.PathLike[str], data: bytes) -> str:
    """Write ``data`` to ``uri`` so that a reader sees the old file or the new one, never half.

    Missing parent folders are created. Returns ``uri`` as a string.
    """
    text = str(uri)
    if is_remote(text):
        filesystem, path = _remote(text)
        with filesystem.open_output_stream(path) as stream:  # S3: visible once closed
            stream.write(data)
        return text
    target = local_path(text)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return text


def write_text(uri: str | os.PathLike[str], text: str) -> str:
    return write_bytes(uri, text.encode("utf-8"))


def list_files(
    uri: str | os.PathLike[str], suffixes: Sequence[str] = (), recursive: bool = True
) -> list[str]:
    """Files under the folder ``uri`` (sorted URIs), optionally only those with ``suffixes``.

    Names starting with a dot (temporary files of an unfinished write) are left out.
    ``FileNotFoundError`` when there is no folder at ``uri``.
    """
    text = str(uri).rstrip("/")
    wanted = tuple(s.lower() for s in suffixes)
    if not is_remote(text):
        root = local_path(text)
        if not root.is_dir():
            raise FileNotFoundError(f"no folder at {root}")
        found = root.rglob("*") if recursive else root.iterdir()
        names = [str(p) for p in found if p.is_file() and not p.name.startswith(".")]
    else:
        filesystem, path = _remote(text)
        if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no folder at {text}")
        selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
        scheme = text.split("://", 1)[0]
        names = [
            f"{scheme}://{info.path}"
            for info in filesystem.get_file_info(selector)
            if info.type == pafs.FileType.File and not info.base_name.startswith(".")
        ]
    return sorted(n for n in names if not wanted or n.lower().endswith(wanted))


def remove(uri: str | os.PathLike[str]) -> None:
    """Delete the file or the whole folder at ``uri``; nothing there is not an error."""
    text = str(uri)
    kind = _kind(text)
    if kind == "none":
        return
    if not is_remote(text):
        local = local_path(text)
        shutil.rmtree(local) if kind == "dir" else local.unlink()
        return
    filesystem, path = _remote(text)
    if kind == "dir":
        filesystem.delete_dir(path)
    else:
        filesystem.delete_file(path)


def bucket_problem(uri: str | os.PathLike[str]) -> str | None:
    """Why ``uri`` cannot be reached at all (no bucket named, a bucket that does not exist,
    no connection), or ``None``; local paths have none. For checks before the long work."""
    text = str(uri)
    if not is_remote(text):
        return None
    scheme, _, rest = text.partition("://")
    bucket = rest.split("/", 1)[0]
    if not bucket:
        return f"{text} names no bucket"
    try:
        if not exists(f"{scheme}://{bucket}"):
            return f"bucket {bucket!r} does not exist (in {text})"
    except (OSError, ValueError) as err:
        return f"cannot reach {text}: {' '.join(str(err).split())}"
    return None


@contextlib.contextmanager
def publish_directory(uri: str | os.PathLike[str], last: str | None = None) -> Iterator[Path]:
    """Yield a local staging folder; when the block ends without error, it is published at ``uri``.

    Locally the staging folder sits beside the target and is renamed into place whole (an older
    folder there is swapped out first); on an object store the old marker (the staged file
    named ``last``) is deleted, the old files removed, the new ones uploaded and the marker
    uploaded after all of them. An error in the block publishes nothing and leaves what was at
    ``uri`` as it was. ``FileExistsError`` when another process published the same local folder
    in between.
    """
    text = str(uri).rstrip("/")
    if is_remote(text):
        staging = Path(tempfile.mkdtemp(prefix="cirray-publish-"))
        try:
            yield staging
            if last:
                remove(join(text, last))
            remove(text)
            _upload_tree(staging, text, last)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    target = local_path(text)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    )
    try:
        yield staging
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, target: Path) -> None:
    retired = None
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired / target.name)
    try:
        os.rename(staging, target)
    except OSError as err:
        if target.exists():
            raise FileExistsError(f"{target} was published by another process meanwhile") from err
        raise
    finally:
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)


def _upload_tree(local: Path, uri: str, last: str | None) -> None:
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for path in sorted(files, key=lambda p: p.relative_to(local).as_posix() == last):
        write_bytes(join(uri, path.relative_to(local).as_posix()), path.read_bytes())


def stage_to_local(uri: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> Path:
    """A local folder with the content of ``uri``: the folder itself when it is local.

    A remote folder is copied once under ``cache_dir`` (keyed by its URI) and reused after;
    the copy is complete only once its marker is written, so an interrupted copy is redone.
    """
    text = str(uri)
    if not is_remote(text):
        local = local_path(text)
        if not local.exists():
            raise FileNotFoundError(f"nothing at {local}")
        return local
    key = hashlib.sha1(text.rstrip("/").encode()).hexdigest()[:16]
    target = Path(cache_dir).expanduser() / f"staged-{key}"
    if (target / _STAGED).is_file():
        return target
    filesystem, path = _remote(text)
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {text}")
    logger.info("copying %s to %s", text, target)
    with publish_directory(target, last=_STAGED) as staging:
        pafs.copy_files(path, str(staging), source_filesystem=filesystem, use_threads=True)
        (staging / _STAGED).write_text(text)
    return target


def file_signature(uri: str | os.PathLike[str]) -> str:
    """Size and modification time of a file, local or remote: changes when the file does."""
    text = str(uri)
    if not is_remote(text):
        try:
            stat = local_path(text).resolve().stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"nothing at {text}") from None
        return f"{text}:{stat.st_size}:{stat.st_mtime_ns}"
    filesystem, path = _remote(text)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {text}")
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    return f"{text}:{info.size}:{mtime}"
