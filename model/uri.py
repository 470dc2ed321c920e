"""Read a file named by a local path or a URI (``s3://bucket/key``, ``file://...``).

The model library needs only this much storage: weights and whitening come from a path or S3.
S3 goes through ``pyarrow.fs``, which honours the usual AWS settings (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_REGION``...), so the same call reads from AWS or a local S3 server.
pyarrow is imported only when a URI is not a local path.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["is_remote", "read_bytes"]


def is_remote(uri: str | Path) -> bool:
    """True for ``scheme://`` URIs other than ``file://``."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def read_bytes(uri: str | Path) -> bytes:
    """The whole content of ``uri``; ``FileNotFoundError`` naming it when there is nothing there."""
    text = str(uri)
    if not is_remote(text):
        path = Path(text.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no file at {path}")
        return path.read_bytes()
    from pyarrow import fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot open {text!r}: {err}") from err
    info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no file at {text}")
    with filesystem.open_input_stream(path) as stream:
        return stream.read()
