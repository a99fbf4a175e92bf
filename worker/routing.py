"""Whether this worker may take a job: routing and constraints (PROTOCOL §1)."""

from __future__ import annotations

import re
import socket

from worker.config import Settings
from worker.spec import JobDocument


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("-")[0].split("+")[0])[:3])


def unsatisfied(
    doc: JobDocument, settings: Settings, capabilities: set[str], features: set[str], version: str
) -> str | None:
    """Return why this worker cannot take `doc`, or None when it can."""
    r, c = doc.routing, doc.constraints
    checks = [
        (r.worker_id and r.worker_id != settings.worker_id,
         f"routing.worker_id is {r.worker_id!r}; this worker is {settings.worker_id!r}"),
        (r.worker_pool and r.worker_pool != settings.pool,
         f"routing.worker_pool is {r.worker_pool!r}; this worker serves pool {settings.pool!r}"),
        (c.allowed_worker_pools and settings.pool not in c.allowed_worker_pools,
         f"constraints.allowed_worker_pools is {c.allowed_worker_pools}; "
         f"this worker serves pool {settings.pool!r}"),
        (c.require_privileged and not settings.privileged,
         "constraints.require_privileged is true; this worker is not privileged"),
    ]
    for failed, why in checks:
        if failed:
            return why
    if (r.affinity or r.anti_affinity) and (
            placed := _affinity(r.affinity, r.anti_affinity, labels(settings))) is not None:
        return placed
    missing = [cap for cap in c.required_capabilities if cap not in capabilities]
    if missing:
        return f"constraints.required_capabilities: this worker lacks {missing}"
    have = features | set(settings.features)
    missing = [f for f in c.required_features if f not in have]
    if missing:
        return f"constraints.required_features: this worker lacks {missing}"
    if c.minimum_worker_version and _version(version) < _version(c.minimum_worker_version):
        return (f"constraints.minimum_worker_version is {c.minimum_worker_version}; "
                f"this worker is {version}")
    return None


def labels(settings: Settings) -> dict[str, str]:
    """What routing.affinity and anti_affinity match: the configured labels, and this
    worker's host, worker_id and pool."""
    return {**settings.labels, "host": socket.gethostname(), "worker_id": settings.worker_id,
            "pool": settings.pool}


def _affinity(want: dict[str, str], avoid: dict[str, list[str]],
              mine: dict[str, str]) -> str | None:
    """Why labels `mine` do not meet affinity `want` and anti-affinity `avoid`, or None."""
    for key, value in want.items():
        if key not in mine:
            return f"routing.affinity.{key} is {value!r}; this worker has no label {key!r}"
        if mine[key] != value:
            return f"routing.affinity.{key} is {value!r}; this worker's is {mine[key]!r}"
    for key, values in avoid.items():
        if mine.get(key) in values:
            return f"routing.anti_affinity.{key} excludes {mine[key]!r}, this worker's {key}"
    return None
