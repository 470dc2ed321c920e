"""A Python client of the search service's HTTP API (``pipeline.serve``).

    client = SearchClient("http://127.0.0.1:8000")
    client.search("query.jpg", k=10)            # a path, bytes or a file object
    client.search_vector(descriptor, qe=True)   # a descriptor of the index's dimension
    client.reload()                             # serve the newest index version

Answers are :class:`Answer` objects (results best first and the index version that gave
them). A connection error or a 5xx answer (a replica being replaced) is retried with
back-off up to ``retries`` times; a 4xx is the caller's mistake and raises
:class:`SearchError` at once with the service's message.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import requests

__all__ = ["Answer", "Result", "SearchClient", "SearchError"]


class SearchError(RuntimeError):
    """A request the service refused (4xx) or could not answer after the retries."""

    def __init__(self, status: int | None, detail: str) -> None:
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status, self.detail = status, detail


@dataclass(frozen=True)
class Result:
    image_id: str
    uri: str | None
    score: float
    inliers: int | None = None
    """Spatially verified matches with the query (asked with ``rerank``)."""


@dataclass(frozen=True)
class Answer:
    results: list[Result]
    version: int
    reranked: dict[str, int] | None = None
    """What re-ranking counted: candidates, verified, without_features, query_features."""

    @property
    def image_ids(self) -> list[str]:
        return [r.image_id for r in self.results]


class SearchClient:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 0.2,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.session = requests.Session()
        self.retried = 0
        """How many attempts failed and were retried (all calls of this client)."""

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health").json()

    def search(
        self,
        photo: str | os.PathLike[str] | bytes | IO[bytes],
        k: int = 10,
        qe: bool = False,
        *,
        rerank: int = 0,
        kreciprocal: int = 0,
        content_type: str | None = None,
    ) -> Answer:
        """The top ``k`` photos like ``photo`` (a path, its bytes, or a binary file); with
        ``kreciprocal``, the top ``kreciprocal`` re-ordered by k-reciprocal encoding; with
        ``rerank``, then the top ``rerank`` re-ranked by spatial verification (each result's
        ``inliers``)."""
        if isinstance(photo, bytes | bytearray):
            data = bytes(photo)
        elif isinstance(photo, str | os.PathLike):
            data = Path(photo).read_bytes()
            content_type = content_type or mimetypes.guess_type(str(photo))[0]
        elif isinstance(photo, io.IOBase) or hasattr(photo, "read"):
            data = photo.read()
        else:
            raise TypeError(f"photo must be a path, bytes or a file, not {type(photo).__name__}")
        response = self._request(
            "POST",
            "/search",
            params={
                "k": k,
                "qe": str(bool(qe)).lower(),
                "rerank": int(rerank),
                "kreciprocal": int(kreciprocal),
            },
            data=data,
            headers={"Content-Type": content_type or "image/jpeg"},
        )
        return _answer(response.json())

    def search_vector(
        self, vector: Sequence[float], k: int = 10, qe: bool = False, *, kreciprocal: int = 0
    ) -> Answer:
        """The top ``k`` photos for a descriptor (L2-normalised by the service); with
        ``kreciprocal``, the top ``kreciprocal`` re-ordered by k-reciprocal encoding."""
        body = {"vector": [float(v) for v in vector], "k": k, "qe": qe}
        if kreciprocal:
            body["kreciprocal"] = int(kreciprocal)
        return _answer(self._request("POST", "/search", json=body).json())

    def search_batch(
        self,
        *,
        vectors: Sequence[Sequence[float]] | None = None,
        photos: Sequence[bytes] | None = None,
        k: int = 10,
        qe: bool = False,
        rerank: int = 0,
        kreciprocal: int = 0,
    ) -> list[Answer | str]:
        """Many queries in one request (``POST /search/batch``), all answered by one index
        version: an :class:`Answer` per query, or the reason a photo has none (a string).
        With ``rerank`` (photos only) and ``kreciprocal``, each query re-ranked as ``search``
        does."""
        body: dict[str, Any] = {
            "k": k,
            "qe": qe,
            "rerank": int(rerank),
            "kreciprocal": int(kreciprocal),
        }
        if vectors is not None:
            body["vectors"] = [[float(x) for x in v] for v in vectors]
        if photos is not None:
            body["photos"] = [base64.b64encode(p).decode("ascii") for p in photos]
        data = self._request("POST", "/search/batch", json=body).json()
        return [
            item["error"] if item.get("error") else _answer({**item, "version": data["version"]})
            for item in data["answers"]
        ]

    def image(self, image_id: str) -> bytes:
        """The JPEG thumbnail of a stored photo."""
        return self._request("GET", f"/images/{requests.utils.quote(image_id, safe='')}").content

    def reload(self, version: int | None = None) -> dict[str, Any]:
        """Have the service serve ``version`` (default: the newest complete one)."""
        params = {"version": version} if version is not None else None
        return self._request("POST", "/reload", params=params).json()

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self.session.request(
                    method, self.url + path, timeout=self.timeout, **kwargs
                )
            except (requests.ConnectionError, requests.Timeout) as err:
                last = f"{method} {path}: {err}"
                continue
            if response.status_code >= 500:
                last = f"{method} {path}: {response.status_code} {response.text[:200]}"
                continue
            if response.status_code >= 400:
                raise SearchError(response.status_code, _detail(response))
            return response
        raise SearchError(None, f"no answer after {self.retries + 1} attempts; last: {last}")


def _detail(response: requests.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    return str(detail) if detail else response.text[:500]


def _answer(data: dict[str, Any]) -> Answer:
    return Answer(
        results=[
            Result(r["image_id"], r.get("uri"), float(r["score"]), r.get("inliers"))
            for r in data["results"]
        ],
        version=int(data["version"]),
        reranked=data.get("reranked"),
    )
