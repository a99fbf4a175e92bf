"""Where jobs come from besides the local inbox, and where results and status go too.

The local spool is always the worker's state of record. A `Remote` adds a shared
queue: it delivers jobs into the spool (they then run exactly like dropped files),
mirrors their status, decides which worker's result is *the* result, and hears
about cancels. `Remote` itself is the no-op used when the spool is the only source.
"""

from __future__ import annotations

import selectors
from collections.abc import Callable
from typing import Any

#: deliver(message_id, job_bytes, running_attempt) hands one job to the supervisor;
#: running_attempt is the attempt a dead worker was running (from the shared status), or None.
Deliver = Callable[[str, bytes, "int | None"], None]
#: cancel(job_id): a client asked through the queue to cancel this job.
Cancel = Callable[[str], None]
#: fits(profile): why the worker with this profile (`routing.Profile.to_json`) cannot take
#: the job at hand, or None when it can.
Fits = Callable[[dict[str, Any]], "str | None"]


class Remote:
    """The hooks the supervisor calls; this base class is the spool-only worker's (no-op)."""

    name = "spool"
    peers_seen = 0  #: grows each time the live workers of the pool, or their profiles, change

    def open(self, selector: selectors.BaseSelector, deliver: Deliver, cancel: Cancel,
             profile: dict[str, Any] | None = None) -> None:
        """Connect, register any fd with `selector`, recover what this worker had claimed,
        and show the other workers `profile` (what jobs it can take)."""

    def poll(self, now: float, free_slots: int, running: list[str]) -> None:
        """Once per loop pass: claim up to `free_slots` jobs, renew the leases of `running`
        message ids, take over dead workers' jobs, reconnect when disconnected."""

    def next_deadline(self) -> float | None:
        """When the loop must wake for this transport (monotonic), or None."""
        return None

    def stop_intake(self) -> None:
        """Drain: claim nothing more."""

    def close(self) -> None:
        """Disconnect."""

    def status(self, job_id: str, doc: dict[str, Any]) -> None:
        """Mirror a job's live status where other hosts can read it."""

    def publish(self, job_id: str, doc: dict[str, Any]) -> bool:
        """Store the result where all workers see it; False when another worker's came first."""
        return True

    def acknowledge(self, message_id: str, job_id: str, ok: bool) -> None:
        """The job's result is durably stored: the queue may forget the message."""

    def offer(self, message_id: str, fits: Fits,
              status: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
        """Hand a delivered job this worker cannot take to a live worker that `fits` finds
        able to; return that worker's id (the message is no longer this worker's, `status` is
        its shared status), or None, and why each other live worker cannot take it."""
        return None, {}

    def forward(self, message_id: str, pool: str, status: dict[str, Any]) -> bool:
        """Move a delivered job to the queue of pool `pool` (its routing.worker_pool); False
        when it could not be (it stays here). `status` is its shared status from then on."""
        return False

    def disowned(self, job_id: str) -> bool:
        """Whether the job's message went to another worker or back to the queue: a local
        copy not started yet is dropped, cancellable or not."""
        return False

    def reject(self, message_id: str, record: dict[str, Any]) -> None:
        """A delivered message could not be accepted: record why and never deliver it again."""

    def key_owner(self, key: str) -> str | None:
        """The job that holds idempotency `key` across all workers, or None."""
        return None

    def take_key(self, key: str, job_id: str) -> str:
        """Try to make `job_id` the holder of `key`; return the holder (it or another job)."""
        return job_id

    def result(self, job_id: str) -> dict[str, Any] | None:
        """The shared result of `job_id`, if one exists."""
        return None

    def healthy(self) -> tuple[bool, str]:
        """Whether the queue is reachable (readiness)."""
        return True, "spool"
