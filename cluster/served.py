"""The served state of an index: its ``CURRENT`` record, the one thing every replica follows.

``INDEX/CURRENT`` names the version the service answers from, the SHA-256 of that version's
manifest (what exactly the version is) and the identity of the network that described its
vectors (what a query photo must be described with), with a serial that grows by one at every
change. It is written by the index stage when it publishes a version (unless told not to) and
by the service's ``POST /reload``, always by compare-and-swap (:mod:`model.records`), so two
writers never both win and a version never goes back unseen. Every replica reads it when it
starts and follows it; the router answers from a new state only once every shard replica
holds it (:mod:`cluster.router`).

An index written before the record existed has none: the first reader makes one naming the
newest complete version.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

from cluster import index_store
from model import storage, tables
from model.records import RecordChanged, read_record, write_record

__all__ = [
    "CURRENT",
    "ServedState",
    "current_uri",
    "promote",
    "read_current",
    "served_state",
    "verified",
]

CURRENT = "CURRENT"


@dataclass(frozen=True)
class ServedState:
    """What the service answers from."""

    version: int
    manifest_sha256: str
    network: str | None
    """The identity of the network that described the version's vectors (queries too)."""
    serial: int = 0

    def same_as(self, other: ServedState | None) -> bool:
        """The same version, manifest and network (whatever the serial)."""
        return other is not None and (
            (self.version, self.manifest_sha256, self.network)
            == (other.version, other.manifest_sha256, other.network)
        )

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def current_uri(index: str) -> str:
    return storage.join(index, CURRENT)


def state_of(index: str, version: int | None = None) -> ServedState:
    """The state that serves ``version`` (default: the newest complete one), serial 0."""
    manifest = index_store.read_manifest(index, version)
    number = int(manifest["version"])
    uri = tables.INDEX_VERSION.manifest_uri(storage.join(index, index_store.version_dir(number)))
    digest = hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    network = manifest.get("network") or {}
    return ServedState(number, digest, network.get("identity"))


def read_current(index: str) -> tuple[ServedState | None, str | None]:
    """The ``CURRENT`` record and its tag; ``(None, None)`` when there is none yet."""
    content, tag = read_record(current_uri(index))
    if content is None:
        return None, None
    try:
        return (
            ServedState(
                version=int(content["version"]),
                manifest_sha256=str(content["manifest_sha256"]),
                network=content.get("network"),
                serial=int(content.get("serial", 0)),
            ),
            tag,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{current_uri(index)} is not a served state: {err}") from err


def promote(index: str, version: int | None = None) -> ServedState:
    """Make ``version`` (default: the newest complete one) the served state; returns it.

    A compare-and-swap on ``CURRENT``: a writer that lost the race reads again and writes over
    the winner's record, so the last promotion wins and every one is counted in the serial."""
    target = state_of(index, version)
    while True:
        current, tag = read_current(index)
        if target.same_as(current):
            assert current is not None
            return current
        state = ServedState(
            target.version,
            target.manifest_sha256,
            target.network,
            serial=(current.serial + 1) if current else 1,
        )
        try:
            write_record(current_uri(index), state.as_record(), expected=tag)
        except RecordChanged:
            continue
        return state


def served_state(index: str) -> ServedState:
    """The state to serve now: ``CURRENT``, made from the newest complete version if absent.

    A record naming a version whose manifest changed since (republished) is refused."""
    current, _ = read_current(index)
    if current is None:
        return promote(index)
    return verified(index, current)


def verified(index: str, state: ServedState) -> ServedState:
    """``state``, after checking that its version's manifest is still the one it names; a
    version republished since is refused rather than served as something else."""
    found = state_of(index, state.version)
    if found.manifest_sha256 != state.manifest_sha256:
        raise ValueError(
            f"{current_uri(index)} names v{state.version} with manifest "
            f"{state.manifest_sha256[:12]}, but that version's manifest is now "
            f"{found.manifest_sha256[:12]}; promote a version again (POST /reload)"
        )
    return state
