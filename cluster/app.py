"""The HTTP face of the search service: a FastAPI app as the Ray Serve ingress.

DESIGN.md pins it: ``GET /health``; ``POST /search`` with a photo's bytes (``Content-Type:
image/*``, ``?k=10&qe=false``) or JSON ``{"vector": [...], "k": 10, "qe": false}``, answering
``{"results": [{"image_id", "uri", "score"}, ...]}`` best first; ``POST /search/batch`` with JSON
``{"vectors": [[...], ...]}`` or ``{"photos": ["<base64>", ...]}`` (up to ``BATCH_MAX``), every
answer from one index version; ``GET /images/{image_id}`` a
thumbnail; ``GET /`` the search page; ``/docs`` the OpenAPI page. ``POST /reload`` switches to
the newest complete index version (or ``?version=N``) with no failed query.

Every bad request answers 4xx with ``{"detail": "what is wrong"}`` (a sentence, also for
FastAPI's own validation errors), and nothing a client sends can crash a replica: a body over
the limit (413), a content type that is neither (415), malformed JSON (400), a vector of the
wrong length, with NaN or all zeros, ``k`` out of range (422), a photo that does not decode or
is too small (422), an unknown image id (404).
"""

import asyncio
import base64
import binascii
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from cluster import index_store
from cluster.batching import Batcher
from cluster.catalog import ImageCatalog, images_of_manifest
from cluster.fanout import SearchQuery, SlotSearch, call_retried
from model.kreciprocal import KReciprocalOptions
from model.retrieval import QueryExpansion

__all__ = ["BATCH_MAX", "K_MAX", "MAX_BODY_BYTES", "SearchApp", "api"]

logger = logging.getLogger(__name__)

_Model = TypeVar("_Model", bound=BaseModel)

K_MAX = 1000
BATCH_MAX = 1000
"""Queries one batch request may hold."""
MAX_BODY_BYTES = 20 * 2**20
RERANK_MAX = 1000
"""Most candidates one query may verify (a pair costs milliseconds)."""
RERANK_NEEDS_A_PHOTO = (
    "rerank needs a photo (image/*, or photos in a batch): its local features are what is "
    "verified, and a descriptor has none"
)


class VectorQuery(BaseModel):
    """A query by descriptor: L2-normalised here, of the index's dimension."""

    vector: list[float] = Field(min_length=1)
    k: int = Field(10, ge=1, le=K_MAX)
    qe: bool = False
    kreciprocal: int = Field(0, ge=0, le=RERANK_MAX)
    """Re-order the top KRECIPROCAL by k-reciprocal encoding."""


class BatchQuery(BaseModel):
    """Many queries in one request: descriptors, or photos as base64 (JPEG, PNG, ...)."""

    vectors: list[list[float]] | None = Field(None, min_length=1, max_length=BATCH_MAX)
    photos: list[str] | None = Field(None, min_length=1, max_length=BATCH_MAX)
    k: int = Field(10, ge=1, le=K_MAX)
    qe: bool = False
    rerank: int = Field(0, ge=0, le=RERANK_MAX)
    """Re-rank each photo's top RERANK by spatial verification (photos only)."""
    kreciprocal: int = Field(0, ge=0, le=RERANK_MAX)
    """Re-order each query's top KRECIPROCAL by k-reciprocal encoding."""


class Result(BaseModel):
    image_id: str
    uri: str | None
    score: float
    inliers: int | None = None
    """Matches spatially verified with the query photo (with ``rerank``; null: not verified)."""


class Reranked(BaseModel):
    candidates: int
    """Results verified: the top ``rerank``."""
    verified: int
    """Of those, the ones with enough inliers, moved first."""
    without_features: int
    """Of those, the ones the index has no local features of (left in place)."""
    query_features: int
    """Local features found in the query photo (none: nothing can be verified)."""


class SearchAnswer(BaseModel):
    results: list[Result]
    version: int
    k: int
    qe: bool
    rerank: int = 0
    reranked: Reranked | None = None
    kreciprocal: int = 0


class BatchItem(BaseModel):
    results: list[Result] | None = None
    error: str | None = None
    """Why this photo has no answer (it does not decode, or is too small)."""
    reranked: Reranked | None = None


class BatchAnswer(BaseModel):
    answers: list[BatchItem]
    """One per query, in order."""
    version: int
    """The one index version that answered every query of the request."""
    k: int
    qe: bool
    rerank: int = 0
    kreciprocal: int = 0


class Problem(BaseModel):
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": text}
    for code, text in {
        400: "malformed body",
        404: "unknown image id or version",
        413: "body over the size limit",
        415: "neither a photo nor JSON",
        422: "a value out of range, or a photo that cannot be described",
    }.items()
}

api = FastAPI(
    title="cirray search",
    version="1",
    description="Search a cirray index by photo or by descriptor.",
)


def _sentence(errors: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts) or "invalid request"


def _parsed(body: bytes, model: type[_Model]) -> _Model:
    """The JSON ``body`` as ``model``: 400 when it is not JSON, 422 naming what is wrong."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HTTPException(400, f"the body is not valid JSON: {err}") from err
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise HTTPException(422, _sentence(err.errors())) from err


def _photo_bytes(i: int, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise HTTPException(422, f"photos.{i}: not base64: {err}") from err


def _reason(err: BaseException) -> str:
    """The one line an error says, without the traceback Ray adds to a remote call's error."""
    cause = getattr(err, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": _sentence(exc.errors())})


_SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": VectorQuery.model_json_schema()},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@serve.deployment
@serve.ingress(api)
class SearchApp:
    """The ingress: validates requests, searches, names the results; photos go to the router.

    Descriptor queries that arrive together are sent to the slots as one matrix (``Batcher``),
    by the ingress itself, in the version the router serves: a handle call costs milliseconds
    of CPU whatever it carries, so neither a call per request nor a hop through the router is
    paid per query. The router's version is asked again once it is ``version_ttl_s`` old (and
    learnt at once from a reload made here), so another replica's reload reaches these answers
    within that time; each answer comes wholly from one version. The slots' answers are small,
    so they come back by value (Serve's gRPC between replicas), not through the object store:
    on ``bench/search.py`` with four shards a query costs 29 ms of CPU that way, 35 by
    reference."""

    def __init__(
        self,
        router: Any,
        index: str,
        slots: Sequence[Any],
        *,
        qe: QueryExpansion,
        kreciprocal: KReciprocalOptions | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_batch_size: int = 32,
        concurrent_batches: int = 1,
        retry_s: float = 60.0,
        version_ttl_s: float = 0.2,
    ) -> None:
        self.router, self.index = router, index
        self.max_body_bytes = max_body_bytes
        manifest = index_store.read_manifest(index)
        self.dim = int(manifest["dim"])  # a reload never changes it (the router refuses)
        self.catalog = ImageCatalog(images_of_manifest(manifest))
        self._slots = SlotSearch(
            [s.options(_by_reference=False) for s in slots],
            qe,
            kreciprocal=kreciprocal,
            retry_s=retry_s,
        )
        self._search_vector = Batcher(
            self._search_vectors, max_batch_size=max_batch_size, concurrent=concurrent_batches
        )
        self.retry_s, self.version_ttl_s = retry_s, version_ttl_s
        self._version: int | None = None
        self._serial = -1
        self._version_seen = -math.inf
        self._version_lock = asyncio.Lock()

    # --- pages --------------------------------------------------------------------------------

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        html = resources.files("cluster").joinpath("search.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        info = await self.router.info.remote()
        self._learn(info["version"], info["serial"])  # a search after it agrees with it
        return {"status": "ok", "photos": len(self.catalog), **info}

    @api.get(
        "/images/{image_id}",
        responses={200: {"content": {"image/jpeg": {}}}, 404: _ERRORS[404]},
        response_class=Response,
    )
    async def image(self, image_id: str) -> Response:
        if image_id not in self.catalog:
            raise HTTPException(404, f"unknown image_id {image_id!r}")
        try:
            data = self.catalog.thumbnail(image_id)
        except (OSError, ValueError) as err:
            raise HTTPException(404, f"the photo of {image_id} cannot be read: {err}") from err
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    # --- search -------------------------------------------------------------------------------

    @api.post(
        "/search",
        response_model=SearchAnswer,
        responses={code: _ERRORS[code] for code in (400, 413, 415, 422)},
        openapi_extra=_SEARCH_BODY,
    )
    async def search(
        self,
        request: Request,
        k: int = Query(10, ge=1, le=K_MAX, description="results to return"),
        qe: bool = Query(False, description="α-weighted query expansion"),
        *,
        rerank: int = Query(
            0,
            ge=0,
            le=RERANK_MAX,
            description="re-rank the top RERANK by spatial verification of local features "
            "(photos only; the index version must pin local features)",
        ),
        kreciprocal: int = Query(
            0,
            ge=0,
            le=RERANK_MAX,
            description="re-order the top KRECIPROCAL by k-reciprocal encoding over the query "
            "and those photos (a descriptor query sends it in its JSON body)",
        ),
    ) -> dict[str, Any]:
        body = await self._body(request)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json" and rerank:
            raise HTTPException(422, RERANK_NEEDS_A_PHOTO)
        if kind == "application/json":
            query = self._vector_query(body)
            vector, k, qe = await self._checked_vector(query.vector), query.k, query.qe
            kreciprocal = query.kreciprocal
            answer = await self._search_vector(SearchQuery(vector, k, qe, None, kreciprocal))
        elif kind.startswith("image/"):
            # described with the network of the version it is searched in (the router's)
            answer = await self.router.search_photo.remote(
                body, k, qe, rerank=rerank, kreciprocal=kreciprocal
            )
            if isinstance(answer, str):
                raise HTTPException(422, answer)
        else:
            raise HTTPException(
                415,
                f"Content-Type {kind or '(none)'} is neither image/* (a photo) nor "
                "application/json (a descriptor)",
            )
        self._catch_up(answer["version"])
        return {
            "results": self._named(answer["hits"]),
            "version": answer["version"],
            "k": k,
            "qe": qe,
            "rerank": rerank,
            "reranked": answer.get("reranked"),
            "kreciprocal": kreciprocal,
        }

    @api.post(
        "/search/batch",
        response_model=BatchAnswer,
        responses={code: _ERRORS[code] for code in (400, 413, 415, 422)},
    )
    async def search_batch(self, request: Request) -> dict[str, Any]:
        """Up to ``BATCH_MAX`` queries in one request, all answered by one index version:
        ``{"vectors": [[...], ...]}`` or ``{"photos": ["<base64>", ...]}``, with ``k``, ``qe``
        and, for photos, ``rerank``."""
        body = await self._body(request)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise HTTPException(415, f"Content-Type {kind or '(none)'} is not application/json")
        query = self._batch_query(body)
        if query.vectors is not None:
            vectors = np.stack([await self._checked_vector(v) for v in query.vectors])
            answer = await self.router.search_many.remote(
                vectors, query.k, qe=query.qe, kreciprocal=query.kreciprocal
            )
        else:
            photos = [_photo_bytes(i, text) for i, text in enumerate(query.photos or [])]
            answer = await self.router.search_photos.remote(
                photos, query.k, query.qe, rerank=query.rerank, kreciprocal=query.kreciprocal
            )
            if isinstance(answer, str):
                raise HTTPException(422, answer)
        self._catch_up(answer["version"])
        counts = answer.get("reranked") or [None] * len(answer["hits"])
        return {
            "answers": [
                {"error": hits}
                if isinstance(hits, str)
                else {"results": self._named(hits), "reranked": reranked}
                for hits, reranked in zip(answer["hits"], counts, strict=True)
            ],
            "version": answer["version"],
            "k": query.k,
            "qe": query.qe,
            "rerank": query.rerank,
            "kreciprocal": query.kreciprocal,
        }

    async def _search_vectors(self, queries: list[SearchQuery]) -> list[dict[str, Any]]:
        """Requests gathered by ``self._search_vector``: one fan-out to the slots, every answer
        from the version the router serves."""
        version = await self._served_version()
        hits = await self._slots.answer(queries, version)
        return [{"version": version, "hits": h} for h in hits]

    async def _served_version(self) -> int:
        """The router's version, asked again once ``version_ttl_s`` old. While the router is
        being replaced the version known is kept (it is still whole in every slot)."""
        if self._version is not None and self._fresh():
            return self._version
        async with self._version_lock:  # one call answers every batch that waits for it
            if self._version is None:
                self._learn(*await call_retried(self.router, "served", retry_s=self.retry_s))
            elif not self._fresh():
                try:
                    self._learn(*await self.router.served.remote())
                except (RayActorError, ActorUnavailableError) as err:
                    logger.warning("router away (%s); v%d still answers", err, self._version)
                    self._version_seen = time.monotonic()
            assert self._version is not None
            return self._version

    def _fresh(self) -> bool:
        return time.monotonic() - self._version_seen < self.version_ttl_s

    def _learn(self, version: int, serial: int) -> None:
        """The router's state, unless one learnt already is newer (answers can cross)."""
        if serial >= self._serial:
            self._version, self._serial = int(version), int(serial)
        self._version_seen = time.monotonic()

    @staticmethod
    def _batch_query(body: bytes) -> BatchQuery:
        query = _parsed(body, BatchQuery)
        if (query.vectors is None) == (query.photos is None):
            raise HTTPException(422, "send either vectors or photos (base64), not both or neither")
        if query.vectors is not None and query.rerank:
            raise HTTPException(422, RERANK_NEEDS_A_PHOTO)
        return query

    def _named(self, hits: list[Any]) -> list[dict[str, Any]]:
        uris = self.catalog.uris(np.array([h.image_id for h in hits], dtype=object))
        return [
            {"image_id": h.image_id, "uri": uri, "score": h.score, "inliers": h.inliers}
            for h, uri in zip(hits, uris, strict=True)
        ]

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise HTTPException(
                413, f"body of {declared} bytes; the limit is {self.max_body_bytes}"
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise HTTPException(413, f"body over the limit of {self.max_body_bytes} bytes")
        if not body:
            raise HTTPException(400, "empty body: send a photo (image/*) or JSON with a vector")
        return bytes(body)

    @staticmethod
    def _vector_query(body: bytes) -> VectorQuery:
        return _parsed(body, VectorQuery)

    async def _checked_vector(self, values: list[float]) -> np.ndarray:
        if len(values) != self.dim:
            raise HTTPException(
                422, f"vector has {len(values)} values; this index has dimension {self.dim}"
            )
        if not all(math.isfinite(v) for v in values):
            raise HTTPException(422, "vector holds NaN or infinite values")
        vector = np.asarray(values, dtype=np.float64)
        norm = float(np.linalg.norm(vector))
        if not math.isfinite(norm) or norm < 1e-12:
            raise HTTPException(422, "vector has no direction (its norm is zero)")
        return (vector / norm).astype(np.float32)

    def _catch_up(self, version: int) -> None:
        """After a reload, learn the photos a newer version added."""
        if version != getattr(self, "_catalog_version", None):
            self.catalog.add(images_of_manifest(index_store.read_manifest(self.index, version)))
            self._catalog_version = version

    # --- operations ---------------------------------------------------------------------------

    @api.post("/reload", responses={404: _ERRORS[404], 422: _ERRORS[422]})
    async def reload(
        self, version: int | None = Query(None, ge=1, description="default: the newest")
    ) -> dict[str, Any]:
        try:
            answer = await self.router.reload.remote(version)
        except FileNotFoundError as err:
            raise HTTPException(404, _reason(err)) from err
        except ValueError as err:
            raise HTTPException(422, _reason(err)) from err
        except TimeoutError as err:
            raise HTTPException(503, _reason(err)) from err
        self._learn(*await self.router.served.remote())
        self._catch_up(answer["version"])
        return answer
