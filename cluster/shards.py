"""The shards of an index version that one serving slot holds, searched as one.

A slot is what one Ray Serve shard deployment serves (``cluster.deployments.IndexShard``): of
a version's shards ``0 .. S-1``, slot ``i`` of ``n`` holds those with ``number % n == i``, so a
version that grows by new shards spreads them over the slots it already has. A slot answers
with its canonical top k over its shards (:func:`cluster.index_store.merge_topk` of each
shard's :func:`~cluster.index_store.shard_topk`), global ids and image_ids, and the router
merges the slots the same way: the result is that of one unsharded index, ties included.

Versions. A slot may hold two versions at once (the one being served and the next, during a
reload), so that a query is answered wholly by the version it was sent to. Shard files that a
newer version shares with an older one (``v2`` lists ``v1``'s shards) are loaded once, and each
search passes its own version's settings (``nprobe``) to FAISS with the call, so a shared file
answers each version as that version's manifest says. A query
for a version the slot does not hold loads it first (a restarted replica, a replica that missed
the reload's warm-up call): slow once, never wrong.

GPUs. ``gpu=True`` (with a FAISS build that sees one) clones each shard that FAISS's GPU code
can hold to GPU 0 (:class:`GpuDevice`, deciding by :func:`gpu_plan`), and keeps the rest on the
CPU with one logged line each. Every GPU shard of a slot shares one ``StandardGpuResources``,
and FAISS allows one call at a time on it: Serve runs a replica's synchronous methods in a
thread pool, up to ``max_ongoing_requests`` at once, so the GPU searches take its lock
(:class:`DeviceIndex`). The CPU index of each shard is kept: the stored vectors αQE asks for
are read from it (FAISS's GPU IVF indexes have no ``reconstruct``), and it answers a search
for more results than the GPU selects (:data:`GPU_MAX_K`).

Ray-free and torch-free: NumPy, FAISS and the storage layer.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import faiss
import numpy as np

from cluster import index_store
from model.local_feature_store import LocalFeatureStore
from model.local_features import LocalFeatures

if TYPE_CHECKING:  # torch: imported by the replicas that re-rank, when they first do
    from model.verification import VerifyOptions

__all__ = [
    "GPU_MAX_K",
    "GPU_PQ_CODE_BYTES",
    "GPU_SHARED_MEMORY",
    "DeviceIndex",
    "GpuDevice",
    "GpuPlan",
    "Loaded",
    "ShardSet",
    "SlotResult",
    "gpu_count",
    "gpu_plan",
    "search_parts",
    "slot_shards",
]

logger = logging.getLogger(__name__)

GPU_MAX_K = 2048
"""The most results (and IVF lists probed) FAISS's GPU k-selection takes per query
(``GPU_MAX_SELECTION_K`` of CUDA builds); a search for more runs on the shard's CPU index."""

GPU_PQ_CODE_BYTES = frozenset({1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96})
"""Bytes per code (sub-quantizers of 8 bits) that GPU IVF-PQ holds (``IVFPQ::
isSupportedPQCodeLength``); 56 and more only with float16 lookup tables."""

GPU_SHARED_MEMORY = 48 * 1024
"""Shared memory per block that FAISS checks IVF-PQ's lookup tables against
(``cudaDeviceProp::sharedMemPerBlock``, 48 KiB on every CUDA GPU): ``M * 256`` entries of 4
bytes, or 2 with float16 tables."""

_GPU_SQ_TYPES = frozenset(
    getattr(faiss.ScalarQuantizer, name)
    for name in (
        "QT_8bit",
        "QT_8bit_uniform",
        "QT_8bit_direct",
        "QT_4bit",
        "QT_4bit_uniform",
        "QT_6bit",
        "QT_fp16",
    )
)
"""Scalar quantizers GPU IVF-SQ implements (``isSQSupported``)."""


def gpu_count() -> int:
    """GPUs this FAISS build can use (0 for faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def slot_shards(shard_count: int, slot: int, slots: int) -> list[int]:
    """The shard numbers slot ``slot`` of ``slots`` serves: ``number % slots == slot``."""
    if not 0 <= slot < slots:
        raise ValueError(f"slot {slot} of {slots}")
    return [number for number in range(shard_count) if number % slots == slot]


@dataclass(frozen=True)
class SlotResult:
    """A slot's top k, best first: the same shapes for every slot, padding where empty."""

    scores: np.ndarray
    """float32 ``[nq, k]``; ``-inf`` where empty."""
    ids: np.ndarray
    """int64 ``[nq, k]`` global ids; -1 where empty."""
    image_ids: np.ndarray
    """object ``[nq, k]``; ``None`` where empty."""
    version: int


@dataclass(frozen=True)
class GpuPlan:
    """Where FAISS's GPU cloner can put an index, and how: what :func:`gpu_plan` decides."""

    gpu: bool
    """Cloned to the GPU (else searched on the CPU)."""
    float16_lookup: bool = False
    """IVF-PQ with float16 lookup tables (``GpuClonerOptions.useFloat16``)."""
    reason: str = ""
    """Why, in words, for the log line."""


def gpu_plan(index: faiss.Index) -> GpuPlan:
    """Whether FAISS's GPU code (its own kernels, not cuVS) holds the CPU ``index``, and how.

    GPU FAISS clones a flat index, IVF-Flat, IVF-SQ (most quantizers) and IVF-PQ with a flat
    coarse quantizer, behind pre-transforms (OPQ, PCA) too; nothing else (HNSW, refinement,
    plain PQ, ...). IVF-PQ codes must be one of :data:`GPU_PQ_CODE_BYTES` bytes of 8-bit
    sub-quantizers, and their lookup tables must fit :data:`GPU_SHARED_MEMORY`: float32 tables
    up to 48 bytes per code, float16 ones (a little less precise) up to 96. ``auto``'s 128-
    to 256-byte codes stay on the CPU. ``nprobe`` must not pass :data:`GPU_MAX_K`.
    """
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):  # the cloner copies the transforms
        inner = faiss.downcast_index(inner.index)
    kind = type(inner).__name__
    if type(inner) in (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2):
        return GpuPlan(True, reason="flat index")
    if type(inner) not in (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer, faiss.IndexIVFPQ):
        return GpuPlan(False, reason=f"FAISS has no GPU version of {kind}")
    inner = cast(faiss.IndexIVF, inner)  # one of the three IVF indexes just listed
    quantizer = faiss.downcast_index(inner.quantizer)
    if type(quantizer) not in (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2):
        return GpuPlan(
            False, reason=f"its coarse quantizer is {type(quantizer).__name__}, not a flat one"
        )
    if inner.nprobe > GPU_MAX_K:
        return GpuPlan(False, reason=f"nprobe {inner.nprobe} is past the GPU's {GPU_MAX_K}")
    if isinstance(inner, faiss.IndexIVFScalarQuantizer):
        if inner.sq.qtype not in _GPU_SQ_TYPES:
            return GpuPlan(False, reason=f"GPU IVF-SQ lacks scalar quantizer {inner.sq.qtype}")
        return GpuPlan(True, reason=kind)
    if isinstance(inner, faiss.IndexIVFPQ):
        m, bits = int(inner.pq.M), int(inner.pq.nbits)
        if bits != 8:
            return GpuPlan(False, reason=f"GPU IVF-PQ takes 8-bit sub-quantizers, not {bits}-bit")
        if m not in GPU_PQ_CODE_BYTES:
            return GpuPlan(
                False,
                reason=f"GPU IVF-PQ holds codes of {sorted(GPU_PQ_CODE_BYTES)} bytes, not {m}",
            )
        if m * 256 * 4 > GPU_SHARED_MEMORY:
            return GpuPlan(
                True,
                float16_lookup=True,
                reason=f"IVF-PQ of {m} bytes: float16 lookup tables (float32 ones need "
                f"{m * 256 * 4} bytes of shared memory, a GPU block has {GPU_SHARED_MEMORY})",
            )
        return GpuPlan(True, reason=f"IVF-PQ of {m} bytes")
    return GpuPlan(True, reason=kind)


class DeviceIndex:
    """A FAISS index searched on the GPU where a GPU clone of it exists, else on the CPU.

    ``cpu`` is the index as loaded; ``on_device`` its clone (``index_cpu_to_gpu``) and ``lock``
    the lock of the GPU resources the clone uses: FAISS allows one call at a time on those, so
    every search of the clone holds it. A search for more than :data:`GPU_MAX_K` results, and
    every ``reconstruct_batch`` (the stored vectors αQE asks for), read the CPU index, which is
    never touched by more than what FAISS allows on a CPU index (concurrent searches).
    Anything with ``d``, ``ntotal`` and ``search(x, k)`` like a FAISS index."""

    def __init__(
        self,
        cpu: faiss.Index,
        on_device: faiss.Index | None = None,
        *,
        lock: threading.Lock | None = None,
    ) -> None:
        if on_device is not None and lock is None:
            raise ValueError("an index on a GPU needs the lock of its GPU resources")
        self.cpu = cpu
        self._device = on_device
        self._lock = lock if lock is not None else threading.Lock()  # unused without a device

    @property
    def d(self) -> int:
        return int(self.cpu.d)

    @property
    def ntotal(self) -> int:
        return int(self.cpu.ntotal)

    @property
    def on_gpu(self) -> bool:
        return self._device is not None

    def search(self, x: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """``params``: FAISS search parameters of this call (``None``: the index's own)."""
        if self._device is not None and k <= GPU_MAX_K:
            with self._lock:
                # read again under the lock: release() may have dropped it while this waited;
                # no reference to the clone outlives the lock (its destructor frees GPU memory)
                if self._device is not None:
                    return index_store.faiss_search(self._device, x, k, params=params)
        return index_store.faiss_search(self.cpu, x, k, params=params)

    def reconstruct_batch(self, labels: np.ndarray) -> np.ndarray:
        return self.cpu.reconstruct_batch(labels)

    def release(self) -> None:
        """Free the GPU clone (under the lock, so no search is using it); searches that still
        hold this index run on the CPU one."""
        if self._device is not None:
            with self._lock:
                self._device = None


class GpuDevice:
    """One GPU's FAISS resources and the lock that makes their use one call at a time; it
    clones indexes there as :func:`gpu_plan` decides (:meth:`place`)."""

    def __init__(self, device: int = 0) -> None:
        self.device = device
        self.lock = threading.Lock()
        self.resources = faiss.StandardGpuResources()

    def place(self, index: faiss.Index, *, name: str = "index") -> DeviceIndex:
        """``index`` (a CPU index, kept) with its GPU clone where FAISS can hold it; a logged
        line says why one stays on the CPU."""
        plan = gpu_plan(index)
        if not plan.gpu:
            logger.warning("%s stays on the CPU: %s", name, plan.reason)
            return DeviceIndex(index)
        options = faiss.GpuClonerOptions()
        options.useFloat16 = plan.float16_lookup  # IVF-PQ's lookup tables (flat ones stay fp32)
        if hasattr(options, "use_cuvs"):  # gpu_plan knows the limits of FAISS's own kernels
            options.use_cuvs = False
        try:
            with self.lock:
                on_device = faiss.index_cpu_to_gpu(self.resources, self.device, index, options)
        except RuntimeError as err:  # a limit gpu_plan does not know: serve it all the same
            reason = str(err).strip().splitlines()[-1]
            logger.warning("%s stays on the CPU: GPU %d refused it: %s", name, self.device, reason)
            return DeviceIndex(index)
        logger.info("%s on GPU %d: %s", name, self.device, plan.reason)
        return DeviceIndex(index, on_device, lock=self.lock)


@dataclass
class Loaded:
    """One loaded shard: its index (on the GPU where it can be) and its id map."""

    index: DeviceIndex
    id_map: index_store.IdMap

    def search(
        self, queries: np.ndarray, k: int, *, params: Mapping[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` with the search settings ``params`` (``{"nprobe": 16}``) of this call."""
        faiss_params = index_store.search_parameters(self.index.cpu, params or {})
        scores, labels = index_store.shard_topk(self.index, queries, k, params=faiss_params)
        return scores, self.id_map.global_ids(labels)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of global ids held here (exact for Flat; decoded codes for PQ)."""
        labels = np.searchsorted(self.id_map.ids, ids).astype(np.int64)
        return self.index.reconstruct_batch(labels)


def search_parts(
    parts: Sequence[Loaded],
    queries: np.ndarray,
    k: int,
    *,
    params: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The canonical top ``k`` over ``parts`` (scores, global ids): each shard's
    :func:`~cluster.index_store.shard_topk` with the search settings ``params``, merged by
    :func:`~cluster.index_store.merge_topk`."""
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    found = [part.search(q, k, params=params) for part in parts]
    return index_store.merge_topk([f[0] for f in found], [f[1] for f in found], k)


class ShardSet:
    """Slot ``slot`` of ``slots`` over the versions of the index at ``index`` (path or URI)."""

    def __init__(
        self,
        index: str,
        slot: int = 0,
        slots: int = 1,
        *,
        gpu: bool = False,
        keep_versions: int = 2,
        search_params: Mapping[str, Any] | None = None,
    ) -> None:
        if slots < 1 or not 0 <= slot < slots:
            raise ValueError(f"slot {slot} of {slots}")
        self.index, self.slot, self.slots = index, slot, slots
        self.gpu = gpu and gpu_count() > 0
        self.keep_versions = max(1, keep_versions)
        self.search_params = dict(search_params) if search_params is not None else None
        self._versions: OrderedDict[int, dict[str, Any]] = OrderedDict()  # version → its parts
        self._files: dict[str, Loaded] = {}  # shard file → loaded, shared between versions
        self._lock = threading.Lock()
        self._device: GpuDevice | None = None  # made at the first shard that goes to the GPU
        self.loaded_on_demand = 0
        """Versions a search had to load first (none when the replica followed the state)."""
        self._stores: dict[str, LocalFeatureStore] = {}  # a pin's identity → its features

    @property
    def versions(self) -> list[int]:
        """The versions held now, oldest first."""
        return list(self._versions)

    def load(self, version: int | None = None, *, keep: Sequence[int] = ()) -> int:
        """Hold ``version`` (default: the newest complete one); returns its number. The oldest
        versions beyond ``keep_versions`` are let go, except those in ``keep`` (the one being
        served while the next is loaded)."""
        with self._lock:
            manifest = index_store.read_manifest(self.index, version)
            number = int(manifest["version"])
            if number in self._versions:
                self._versions.move_to_end(number)
                return number
            numbers = slot_shards(len(manifest["shards"]), self.slot, self.slots)
            parts = []
            for i in numbers:
                entry = manifest["shards"][i]
                loaded = self._files.get(entry["file"])
                if loaded is None:
                    loaded = self._load(manifest, i)
                    self._files[entry["file"]] = loaded
                if loaded.index.ntotal:
                    parts.append(loaded)
            params = (
                manifest.get("search_params") or {}
                if self.search_params is None
                else self.search_params
            )
            self._versions[number] = {"manifest": manifest, "parts": parts, "params": params}
            for old in list(self._versions):
                if len(self._versions) <= self.keep_versions:
                    break
                if old != number and old not in keep:
                    del self._versions[old]
            used = {
                entry["file"]
                for held in self._versions.values()
                for entry in held["manifest"]["shards"]
            }
            for name in [name for name in self._files if name not in used]:
                self._files.pop(name).index.release()
            logger.info(
                "slot %d/%d holds v%d: shards %s (%d vectors)",
                self.slot,
                self.slots,
                number,
                numbers,
                sum(int(p.index.ntotal) for p in parts),
            )
            return number

    def _load(self, manifest: Mapping[str, Any], i: int) -> Loaded:
        faiss_index, id_map = index_store.load_shard(
            self.index, manifest, i, search_params=self.search_params
        )
        ivf = faiss.try_extract_index_ivf(faiss_index)
        if ivf is not None:  # reconstruct() of an IVF index needs its direct map
            ivf.make_direct_map()
        if not self.gpu:
            return Loaded(DeviceIndex(faiss_index), id_map)
        if self._device is None:
            self._device = GpuDevice()
        name = f"shard {manifest['shards'][i]['file']}"
        return Loaded(self._device.place(faiss_index, name=name), id_map)

    def on_gpu(self, version: int | None = None) -> list[bool]:
        """Whether each shard of ``version`` this slot holds vectors of is searched on the GPU."""
        return [part.index.on_gpu for part in self._held(version)["parts"]]

    def manifest(self, version: int | None = None) -> dict[str, Any]:
        """The manifest of a held version (default: the newest held)."""
        return self._held(version)["manifest"]

    def _held(self, version: int | None) -> dict[str, Any]:
        if version is None:
            if not self._versions:
                self.load()
            version = next(reversed(self._versions))
        if version not in self._versions:
            self.loaded_on_demand += 1
            self.load(version)
        return self._versions[version]

    def search(self, queries: np.ndarray, k: int, version: int | None = None) -> SlotResult:
        """This slot's canonical top ``k`` of each query in ``version``."""
        held = self._held(version)
        manifest, parts = held["manifest"], held["parts"]
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        n = len(q)
        if not parts:  # a slot with no vectors (more slots than non-empty shards)
            return SlotResult(
                scores=np.full((n, k), -np.inf, np.float32),
                ids=np.full((n, k), -1, np.int64),
                image_ids=np.full((n, k), None, dtype=object),
                version=int(manifest["version"]),
            )
        scores, ids = search_parts(parts, q, k, params=held["params"])
        return SlotResult(
            scores=scores,
            ids=ids,
            image_ids=self._image_ids(parts, ids),
            version=int(manifest["version"]),
        )

    def vectors(self, ids: np.ndarray, version: int | None = None) -> dict[int, np.ndarray]:
        """The stored vectors of those global ``ids`` this slot holds, by id."""
        held = self._held(version)
        wanted = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        wanted = wanted[wanted >= 0]
        out: dict[int, np.ndarray] = {}
        for part in held["parts"]:
            first, last = part.id_map.ids[0], part.id_map.ids[-1]
            mine = wanted[(wanted >= first) & (wanted <= last)]
            if len(mine):
                out.update(zip(mine.tolist(), part.vectors(mine), strict=True))
        return out

    def verify(
        self,
        query: LocalFeatures,
        ids: np.ndarray,
        version: int | None = None,
        *,
        options: VerifyOptions,
    ) -> dict[int, int | None]:
        """Spatial verification of the candidates ``ids`` this slot holds against a query's
        local features: their inliers by id (``None``: a candidate without local features).
        Empty when ``version`` pins no local features."""
        from model.verification import verify_pair  # torch: only replicas that re-rank

        held = self._held(version)
        pin = held["manifest"].get("local_features")
        if not pin or not held["parts"]:
            return {}
        wanted = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        names = self._image_ids(held["parts"], wanted[wanted >= 0])
        mine = [(int(i), str(n)) for i, n in zip(wanted[wanted >= 0], names, strict=True) if n]
        try:
            found = self._store(pin, held["parts"]).features([name for _, name in mine])
        except (OSError, ValueError) as err:  # the pinned features are gone or rewritten
            logger.warning("v%s: local features unusable, left unverified: %s", version, err)
            return {i: None for i, _ in mine}
        return {
            i: None if features is None else verify_pair(query, features, options).inliers
            for (i, _), features in zip(mine, found, strict=True)
        }

    def _store(self, pin: Mapping[str, Any], parts: list[Loaded]) -> LocalFeatureStore:
        """The local features a version pins, looked up for this slot's photos only."""
        with self._lock:
            store = self._stores.get(pin["identity"])
            if store is None:
                names = np.concatenate([p.id_map.image_ids for p in parts]).tolist()
                store = LocalFeatureStore(pin["uri"], names, identity=pin["identity"])
                pinned = {
                    (held["manifest"].get("local_features") or {}).get("identity")
                    for held in self._versions.values()
                }
                self._stores = {k: v for k, v in self._stores.items() if k in pinned}
                self._stores[pin["identity"]] = store
            return store

    @staticmethod
    def _image_ids(parts: list[Loaded], ids: np.ndarray) -> np.ndarray:
        out = np.full(ids.shape, None, dtype=object)
        for part in parts:
            first, last = part.id_map.ids[0], part.id_map.ids[-1]
            mine = (ids >= first) & (ids <= last)
            if mine.any():
                out[mine] = part.id_map.image_ids[np.searchsorted(part.id_map.ids, ids[mine])]
        return out
