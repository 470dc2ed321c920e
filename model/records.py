"""Small records changed only by compare-and-swap, locally and on S3 alike.

A record is one small file (JSON) that several processes may want to change at once: the
``CURRENT`` record of an index (which state the service serves) and a build's lock. Reading
one gives its content and a *tag*; a write names the tag it read (or ``None``: the record must
not exist yet) and fails with :class:`RecordChanged` when someone else wrote in between, so no
write is ever lost unseen.

- S3: the tag is the object's ETag; writes are ``PutObject`` with ``If-Match`` (or
  ``If-None-Match: *`` to create), which S3 (and its look-alikes) apply atomically.
- Local: the tag is the content's SHA-256; a write takes an exclusive ``flock`` on a sibling
  lock file, compares, and renames a temporary file into place, so readers never see half a
  record. (Local files are one machine's: a cluster's records live on S3.)

Torch-free and Ray-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from model import storage

__all__ = ["Lease", "LeaseHeld", "LeaseLost", "RecordChanged", "read_record", "write_record"]

logger = logging.getLogger(__name__)


class RecordChanged(Exception):
    """The record is not what the writer read: someone else changed (or created) it."""


def read_record(uri: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(content, tag)`` of the record at ``uri``; ``(None, None)`` when there is none."""
    if storage.is_remote(uri):
        client, bucket, key = _s3(uri)
        try:
            answer = client.get_object(Bucket=bucket, Key=key)
        except client.exceptions.NoSuchKey:
            return None, None
        return _parsed(answer["Body"].read(), uri), answer["ETag"]
    path = storage.local_path(uri)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    return _parsed(data, uri), _local_tag(data)


def write_record(uri: str, content: dict[str, Any], *, expected: str | None) -> str:
    """Write ``content`` if the record still has tag ``expected`` (``None``: if there is no
    record yet); returns the new tag. :class:`RecordChanged` when it does not."""
    data = json.dumps(content, sort_keys=True, indent=1).encode()
    if storage.is_remote(uri):
        return _write_s3(uri, data, expected)
    path = storage.local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        try:
            found: str | None = _local_tag(path.read_bytes())
        except FileNotFoundError:
            found = None
        if found != expected:
            raise RecordChanged(f"{uri} changed since it was read")
        storage.write_bytes(uri, data)  # atomic: readers never see half a record
    return _local_tag(data)


def _parsed(data: bytes, uri: str) -> dict[str, Any]:
    try:
        content = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{uri} is not a JSON record: {err}") from err
    if not isinstance(content, dict):
        raise ValueError(f"{uri} is not a JSON record (an object)")
    return content


def _local_tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_clients: dict[tuple[str, ...], Any] = {}


def _s3(uri: str) -> tuple[Any, str, str]:
    """A boto3 S3 client (one per process and AWS settings), the bucket and the key."""
    import boto3  # type: ignore[import-untyped]  # only where records live on S3

    settings = (*(os.environ.get(name, "") for name in storage.AWS_SETTINGS), str(os.getpid()))
    client = _clients.get(settings)
    if client is None:
        client = _clients.setdefault(settings, boto3.client("s3"))
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return client, bucket, key


def _write_s3(uri: str, data: bytes, expected: str | None) -> str:
    client, bucket, key = _s3(uri)
    condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
    try:
        answer = client.put_object(Bucket=bucket, Key=key, Body=data, **condition)
    except client.exceptions.ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (
            409,
            412,
        ):
            raise RecordChanged(f"{uri} changed since it was read") from err
        raise
    return str(answer["ETag"])


def _holder_gone(owner: str) -> bool:
    """Whether the holder ``host:pid:nonce`` was a process of this machine that is gone (a
    killed build frees its lease at once for the next run here)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


class LeaseHeld(Exception):
    """Someone else holds the lease and kept it alive for as long as this one would wait."""


class LeaseLost(Exception):
    """The lease was taken over (it expired unrenewed): the work it guarded must not publish."""


class Lease:
    """An exclusive lease kept in a record: who holds it and until when.

    The holder renews it every third of ``ttl_s`` from a thread; one that dies stops renewing,
    and once ``ttl_s`` has passed the next taker replaces it (a compare-and-swap on the expired
    record, so of two takers one wins). :meth:`check` says whether it is still held.
    """

    def __init__(
        self, uri: str, *, ttl_s: float = 60.0, what: str = "this work", renew: bool = True
    ) -> None:
        self.uri, self.ttl_s, self.what, self._renews = uri, ttl_s, what, renew
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._tag: str | None = None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _record(self, expires: float) -> dict[str, Any]:
        return {"owner": self.owner, "expires": expires, "what": self.what}

    def acquire(self, *, wait_s: float = 0.0, poll_s: float = 0.5) -> None:
        """Take the lease, waiting up to ``wait_s`` for a live holder to let go;
        :class:`LeaseHeld` naming the holder when it does not."""
        deadline = time.monotonic() + wait_s
        while True:
            content, tag = read_record(self.uri)
            free = (
                content is None
                or float(content.get("expires", 0)) < time.time()
                or _holder_gone(str(content.get("owner", "")))
            )
            if free:
                try:
                    self._tag = write_record(
                        self.uri, self._record(time.time() + self.ttl_s), expected=tag
                    )
                except RecordChanged:
                    continue  # another taker won this round: look again
                break
            if time.monotonic() >= deadline:
                assert content is not None
                left = float(content["expires"]) - time.time()
                raise LeaseHeld(
                    f"{content.get('what', self.what)} is under way by {content.get('owner')} "
                    f"({self.uri}; its lease runs {left:.0f} s more unless renewed)"
                )
            time.sleep(poll_s)
        if self._renews:
            self._renewer = threading.Thread(target=self._keep, name="lease", daemon=True)
            self._renewer.start()

    def renew(self) -> None:
        """Extend the lease by ``ttl_s``; :class:`LeaseLost` when it was taken over."""
        try:
            self._tag = write_record(
                self.uri, self._record(time.time() + self.ttl_s), expected=self._tag
            )
        except RecordChanged:
            self._lost.set()
            raise LeaseLost(
                f"the lease {self.uri} was taken over; {self.what} stops here"
            ) from None

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLost:
                logger.error("lost the lease %s: someone took it over", self.uri)
                return
            except Exception as err:  # storage hiccup: try again next round
                logger.warning("could not renew the lease %s: %s", self.uri, err)

    def check(self) -> None:
        """:class:`LeaseLost` when the lease was taken over since it was acquired."""
        if self._lost.is_set():
            raise LeaseLost(f"the lease {self.uri} was taken over; {self.what} stops here")

    def release(self) -> None:
        """Let go: the record is marked expired (a compare-and-swap, so a lease taken over is
        left to its new holder)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._tag is not None and not self._lost.is_set():
            with contextlib.suppress(RecordChanged):
                write_record(self.uri, self._record(0.0), expected=self._tag)
        self._tag = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
