"""Fetching one photo's bytes from a local path, ``s3://`` or ``http(s)://``, with a web policy.

Web photos are fetched the way img2dataset fetches them: each ingest task runs a bounded
number of requests at once (a thread pool per batch sharing one connection pool), every
request has a timeout, a server error (5xx, 408, 429), a timeout or a dropped connection is
retried with exponential back-off, a client error (404 and the other 4xx) is final at once,
and a body is streamed and abandoned as soon as it passes the size limit, so a 2 GB video
behind a photo URL costs at most that limit. Local paths and ``s3://`` objects are read
through the storage layer (pyarrow's S3 client retries on its own), with the same size limit.

Nothing here raises for a bad photo: ``fetch`` returns a ``Fetched`` whose ``error`` is
``"<kind>: <detail>"``. The kind is short and fixed (``http 404``, ``timeout``, ``too big``,
...), so a run can count failures by kind and a re-run can tell a transient failure (worth
fetching again) from a final one (``is_transient``).

Nothing here imports torch: ingest workers must never load it.
"""

from __future__ import annotations

import netrc  # noqa: F401  (see http_session)
import random
import time
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter

from model import storage

__all__ = [
    "TRANSIENT_KINDS",
    "FetchPolicy",
    "Fetched",
    "failure_kind",
    "fetch",
    "http_session",
    "is_transient",
]

TRANSIENT_KINDS = frozenset({"timeout", "connection error", "read error", "http 408", "http 429"})
"""Failure kinds that may succeed later (besides every ``http 5xx``): retried with back-off
within a fetch, and fetched again by a re-run of ingest."""

_CHUNK = 256 * 1024
_MAX_DETAIL = 300


@dataclass(frozen=True)
class FetchPolicy:
    """How one photo is fetched (img2dataset's knobs)."""

    timeout_s: float = 10.0
    """Seconds to wait for a connection or for the next bytes of an answer."""
    total_timeout_s: float = 60.0
    """Seconds one attempt may take in all, so a server that drips bytes cannot hold a thread."""
    retries: int = 3
    """Further attempts after a 5xx, 408, 429, timeout or dropped connection (never for 4xx)."""
    backoff_s: float = 0.5
    """Delay before the first retry; it doubles for each further one (with jitter)."""
    max_bytes: int = 32 * 2**20
    """Largest photo accepted, in bytes; a longer body is abandoned as ``too big``."""
    user_agent: str = "cirray-ingest/0.1"
    """The ``User-Agent`` sent with web requests."""

    def problems(self) -> list[str]:
        """What is wrong with the settings, one message each."""
        out = []
        if self.timeout_s <= 0 or self.total_timeout_s <= 0:
            out.append("timeouts must be positive")
        if self.retries < 0:
            out.append(f"retries must be 0 or more, not {self.retries}")
        if self.backoff_s < 0:
            out.append(f"backoff must be 0 or more seconds, not {self.backoff_s}")
        if self.max_bytes < 1:
            out.append(f"max bytes must be positive, not {self.max_bytes}")
        return out


@dataclass(frozen=True)
class Fetched:
    """One URI's bytes, or why there are none (``"<kind>: <detail>"``)."""

    data: bytes | None
    error: str | None = None
    attempts: int = 1


def failure_kind(error: str) -> str:
    """The kind of a failure reason: the text before its first ``": "``."""
    return error.split(": ", 1)[0]


def is_transient(error: str | None) -> bool:
    """Whether a failure may succeed when fetched again (5xx, 408, 429, timeouts, I/O errors)."""
    if not error:
        return False
    kind = failure_kind(error)
    return kind in TRANSIENT_KINDS or kind.startswith("http 5")


def http_session(pool_size: int) -> requests.Session:
    """A session whose connection pool holds ``pool_size`` connections per host, no retries of
    its own (``fetch`` retries)."""
    # requests imports netrc lazily in the first request of each session; sixteen fetching threads
    # importing it at once deadlocked in importlib's module locks once (CPython 3.11), so it is
    # imported with this module, in one thread.
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def fetch(uri: str, policy: FetchPolicy, session: requests.Session | None = None) -> Fetched:
    """The bytes at ``uri`` (local path, ``s3://``, ``http(s)://``) under ``policy``."""
    if uri.startswith(("http://", "https://")):
        if session is None:
            with http_session(1) as own:
                return _fetch_web(uri, policy, own)
        return _fetch_web(uri, policy, session)
    return _fetch_stored(uri, policy)


def _fetch_stored(uri: str, policy: FetchPolicy) -> Fetched:
    try:
        if not storage.is_remote(uri):
            path = storage.local_path(uri)
            if path.is_file() and path.stat().st_size > policy.max_bytes:
                return Fetched(None, _too_big(path.stat().st_size, policy))
        data = storage.read_bytes(uri)
    except FileNotFoundError as err:
        return Fetched(None, f"missing: {err}")
    except ValueError as err:  # a scheme the storage layer cannot open
        return Fetched(None, f"bad uri: {_short(err)}")
    except OSError as err:
        return Fetched(None, f"read error: {_short(err)}")
    if len(data) > policy.max_bytes:
        return Fetched(None, _too_big(len(data), policy))
    return Fetched(data)


def _fetch_web(uri: str, policy: FetchPolicy, session: requests.Session) -> Fetched:
    attempt = 0
    while True:
        attempt += 1
        data, error = _attempt(uri, policy, session)
        if error is None or not is_transient(error) or attempt > policy.retries:
            return Fetched(data, error, attempt)
        delay = policy.backoff_s * 2 ** (attempt - 1)
        time.sleep(delay * random.uniform(0.5, 1.0))


def _attempt(
    uri: str, policy: FetchPolicy, session: requests.Session
) -> tuple[bytes | None, str | None]:
    start = time.monotonic()
    try:
        with session.get(
            uri,
            stream=True,
            timeout=(policy.timeout_s, policy.timeout_s),
            headers={"User-Agent": policy.user_agent},
        ) as resp:
            if not 200 <= resp.status_code < 300:
                return None, f"http {resp.status_code}: {resp.reason or 'no reason given'}"
            announced = resp.headers.get("Content-Length", "")
            if announced.isdigit() and int(announced) > policy.max_bytes:
                return None, _too_big(int(announced), policy, "announced")
            body = bytearray()
            for chunk in resp.iter_content(_CHUNK):
                body += chunk
                if len(body) > policy.max_bytes:
                    return None, f"too big: more than the limit of {policy.max_bytes:,} bytes"
                if time.monotonic() - start > policy.total_timeout_s:
                    return None, f"timeout: not complete after {policy.total_timeout_s:g} s"
            return bytes(body), None
    except requests.Timeout:
        return None, f"timeout: no answer within {policy.timeout_s:g} s"
    except requests.ConnectionError as err:  # refused, reset, or stalled mid-body
        if "timed out" in str(err):
            return None, f"timeout: no bytes for {policy.timeout_s:g} s"
        return None, f"connection error: {_short(err)}"
    except requests.RequestException as err:  # invalid URL, too many redirects, ...
        return None, f"bad uri: {_short(err)}"


def _too_big(size: int, policy: FetchPolicy, how: str = "") -> str:
    how = f" {how}" if how else ""
    return f"too big: {size:,} bytes{how}, more than the limit of {policy.max_bytes:,}"


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."
