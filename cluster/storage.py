"""Storage access for stages: local paths and ``s3://`` URIs through ``pyarrow.fs``.

Reads go through ``model.uri`` (the model library needs them too); this module adds what
stages need on top: staging a remote folder onto local disk for tools that want files
(PIL, pycolmap), with a marker written last so a half-finished copy is never taken as whole.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from model.uri import is_remote, read_bytes

__all__ = ["file_signature", "is_remote", "read_bytes", "stage_to_local"]

logger = logging.getLogger(__name__)

_COMPLETE = ".staged"


def stage_to_local(uri: str, cache_dir: str | Path) -> Path:
    """A local folder with the content of ``uri``: the folder itself when it is local.

    A remote folder is copied once under ``cache_dir`` (keyed by its URI) and reused after.
    """
    if not is_remote(uri):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"nothing at {path}")
        return path
    from pyarrow import fs as pafs

    key = hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:16]
    target = Path(cache_dir) / f"staged-{key}"
    if (target / _COMPLETE).is_file():
        return target
    filesystem, path = pafs.FileSystem.from_uri(uri)
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {uri}")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    logger.info("copying %s to %s", uri, target)
    pafs.copy_files(path, str(partial), source_filesystem=filesystem, use_threads=True)
    (partial / _COMPLETE).write_text(uri)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def file_signature(uri: str | Path) -> str:
    """Size and modification time of a file, local or remote: changes when the file does."""
    from pyarrow import fs as pafs

    text = str(uri)
    if is_remote(text):
        filesystem, path = pafs.FileSystem.from_uri(text)
    else:
        filesystem, path = pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {text}")
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    return f"{text}:{info.size}:{mtime}"
