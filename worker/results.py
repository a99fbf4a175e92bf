"""The result document (PROTOCOL §3), built from what the supervisor knows about a job's end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from worker.config import Settings
from worker.errors import ErrorCode
from worker.spec import rfc3339

#: Error codes whose job might succeed if run again.
RETRY_RECOMMENDED = frozenset({ErrorCode.KILLED, ErrorCode.WORKER_LOST, ErrorCode.INTERNAL,
                               ErrorCode.TIMEOUT})


@dataclass
class Ending:
    """The facts of one job's end, whichever path led there."""

    job_id: str
    status: str  # completed | failed | timeout | cancelled
    attempt: int = 1
    max_attempts: int = 1
    idempotency_key: str | None = None
    code: ErrorCode | None = None
    message: str = ""
    phase: str = "execution"
    retryable: bool = False
    details: dict[str, Any] | None = None
    started_at: float | None = None  # epoch seconds
    finished_at: float | None = None
    data: Any = None
    output_file: str | None = None
    artifacts: list[str] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    observability: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _ts(epoch: float | None) -> str | None:
    return rfc3339(datetime.fromtimestamp(epoch, UTC)) if epoch is not None else None


def build(end: Ending, settings: Settings) -> dict[str, Any]:
    """The result document for `end`."""
    finished = end.finished_at or time.time()
    started = end.started_at
    doc: dict[str, Any] = {
        "job_id": end.job_id,
        "status": end.status,
        "worker_id": settings.worker_id,
        "worker_pool": settings.pool,
        ("completed_at" if end.status == "completed" else "failed_at"): _ts(finished),
        "execution_summary": {
            "started_at": _ts(started),
            "finished_at": _ts(finished),
            "duration_seconds": round(finished - started, 6) if started else 0.0,
            "attempt": end.attempt,
            "max_attempts": end.max_attempts,
            "idempotency_key": end.idempotency_key,
        },
        "outputs": {"primary": end.output_file, "artifacts": end.artifacts},
        "metrics": end.metrics or {"peak_memory_mb": 0.0, "cpu_seconds": 0.0,
                                   "wall_seconds": 0.0, "disk_read_bytes": 0,
                                   "disk_write_bytes": 0},
        "error": None,
        "progress": end.progress,
        "observability": end.observability,
        "data": end.data,
    }
    if end.code is not None:
        doc["error"] = {
            "code": end.code.value,
            "message": end.message,
            "phase": end.phase,
            "details": end.details,
            "recoverable": end.retryable,
            "retry_recommended": end.code in RETRY_RECOMMENDED,
        }
    doc.update(end.extra)
    return doc
