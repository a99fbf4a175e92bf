"""Whether a worker may take a job: routing and constraints (PROTOCOL §1)."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Any

from worker.config import Settings
from worker.spec import JobDocument


@dataclass(frozen=True)
class Profile:
    """What a job's routing and constraints are judged against: one worker's identity and offer."""

    worker_id: str
    pool: str
    privileged: bool
    labels: dict[str, str]  # the configured labels, and its host, worker_id and pool
    capabilities: frozenset[str]
    features: frozenset[str]  # what its handlers find on the host, and the configured ones
    version: str

    @classmethod
    def of(cls, settings: Settings, capabilities: set[str], features: set[str],
           version: str) -> Profile:
        """This worker's profile."""
        return cls(settings.worker_id, settings.pool, settings.privileged, labels(settings),
                   frozenset(capabilities), frozenset(features | set(settings.features)), version)

    def to_json(self) -> dict[str, Any]:
        """The profile as a JSON object (what a worker shows its peers)."""
        return {"worker_id": self.worker_id, "pool": self.pool, "privileged": self.privileged,
                "labels": self.labels, "capabilities": sorted(self.capabilities),
                "features": sorted(self.features), "version": self.version}

    @classmethod
    def from_json(cls, doc: Any) -> Profile | None:
        """A profile from `to_json`'s form; None when `doc` is not one."""
        try:
            labels = {str(k): str(v) for k, v in doc["labels"].items()}
            return cls(str(doc["worker_id"]), str(doc["pool"]), doc["privileged"] is True, labels,
                       frozenset(map(str, doc["capabilities"])), frozenset(map(str, doc["features"])),
                       str(doc["version"]))
        except (KeyError, TypeError, AttributeError):
            return None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("-")[0].split("+")[0])[:3])


def unsatisfied(doc: JobDocument, me: Profile, who: str = "this worker") -> str | None:
    """Return why the worker `me` (named `who` in the reason) cannot take `doc`, or None."""
    return elsewhere(doc, me, who) or lacking(doc, me, who)


def elsewhere(doc: JobDocument, me: Profile, who: str = "this worker") -> str | None:
    """Why `doc` is meant for other workers than `me` (its routing, or the pools it allows),
    or None. Such a job is judged by a worker it is meant for, never by `me`."""
    r, c = doc.routing, doc.constraints
    if r.worker_id and r.worker_id != me.worker_id:
        return f"routing.worker_id is {r.worker_id!r}; {who} is {me.worker_id!r}"
    if r.worker_pool and r.worker_pool != me.pool:
        return f"routing.worker_pool is {r.worker_pool!r}; {who} serves pool {me.pool!r}"
    if c.allowed_worker_pools and me.pool not in c.allowed_worker_pools:
        return (f"constraints.allowed_worker_pools is {c.allowed_worker_pools}; "
                f"{who} serves pool {me.pool!r}")
    if r.affinity or r.anti_affinity:
        return _affinity(r.affinity, r.anti_affinity, me.labels, who)
    return None


def lacking(doc: JobDocument, me: Profile, who: str = "this worker") -> str | None:
    """What `doc` requires that the worker `me` lacks (privilege, capabilities, features,
    version), or None."""
    c = doc.constraints
    if c.require_privileged and not me.privileged:
        return f"constraints.require_privileged is true; {who} is not privileged"
    missing = [cap for cap in c.required_capabilities if cap not in me.capabilities]
    if missing:
        return f"constraints.required_capabilities: {who} lacks {missing}"
    missing = [f for f in c.required_features if f not in me.features]
    if missing:
        return f"constraints.required_features: {who} lacks {missing}"
    if c.minimum_worker_version and _version(me.version) < _version(c.minimum_worker_version):
        return (f"constraints.minimum_worker_version is {c.minimum_worker_version}; "
                f"{who} is {me.version}")
    return None


def labels(settings: Settings) -> dict[str, str]:
    """What routing.affinity and anti_affinity match: the configured labels, and this
    worker's host, worker_id and pool."""
    return {**settings.labels, "host": socket.gethostname(), "worker_id": settings.worker_id,
            "pool": settings.pool}


def _affinity(want: dict[str, str], avoid: dict[str, list[str]],
              mine: dict[str, str], who: str) -> str | None:
    """Why labels `mine` do not meet affinity `want` and anti-affinity `avoid`, or None."""
    for key, value in want.items():
        if key not in mine:
            return f"routing.affinity.{key} is {value!r}; {who} has no label {key!r}"
        if mine[key] != value:
            return f"routing.affinity.{key} is {value!r}; {who}'s is {mine[key]!r}"
    for key, values in avoid.items():
        if mine.get(key) in values:
            return f"routing.anti_affinity.{key} excludes {mine[key]!r}, {who}'s {key}"
    return None
