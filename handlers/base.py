"""What a handler is and what it gets: the Handler base class, Context and HandlerResult.

A handler runs inside a fresh, sandboxed child process. It sees only its payload,
its Context (progress, work dir, output dir, logger) and the errors in
`worker.errors`; it never sees the spool, the job table or the supervisor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from worker.errors import HandlerError, RetryableError

if TYPE_CHECKING:  # the forker that runs plain handlers never imports pydantic
    from pydantic import BaseModel

__all__ = ["Context", "Handler", "HandlerError", "HandlerResult", "RetryableError"]

#: The message sink the child gives a Context: one dict per framed message.
Send = Callable[[dict[str, Any]], None]


@dataclass
class HandlerResult:
    """What a handler returns: `data` becomes the result's `data`, the files its `outputs`."""

    data: Any = None
    output_file: str | None = None
    artifacts: list[str] = field(default_factory=list)


class Context:
    """The job as a handler sees it: identity, private dirs, limits and a progress channel."""

    def __init__(
        self,
        *,
        job_id: str,
        operation: str,
        attempt: int,
        workdir: str | Path,
        output_dir: str | Path,
        limits: dict[str, Any],
        settings: Mapping[str, Any],
        send: Send,
    ) -> None:
        self.job_id = job_id
        self.operation = operation
        self.attempt = attempt
        self._workdir = str(workdir)  # strings: a job that never asks never runs pathlib's code
        self._output_dir = str(output_dir)
        self.limits = limits
        self.settings = settings
        self._send = send
        self._last_percent = 0

    @property
    def workdir(self) -> Path:
        """The job's private work dir (also its current directory, HOME and TMPDIR)."""
        return Path(self._workdir)

    @property
    def output_dir(self) -> Path:
        """Where the job writes what it produces (shared by the worker's jobs)."""
        return Path(self._output_dir)

    @property
    def logger(self) -> logging.Logger:
        """The job's logger (`guestkit.job.<id>`); its records go to the job's stderr.log."""
        return logging.getLogger(f"guestkit.job.{self.job_id}")

    def report_progress(self, phase: str, percent: int | None = None, message: str = "") -> None:
        """Send a progress report; percent (0-100) never goes down within a job."""
        if percent is not None:
            percent = max(self._last_percent, min(100, max(0, int(percent))))
            self._last_percent = percent
        self._send({"type": "progress", "phase": phase, "percent": percent, "message": message})

    def log(self, message: str, level: str = "info") -> None:
        """Send a log line that the supervisor records under this job's id."""
        self._send({"type": "log", "level": level, "message": message})


class Handler:
    """Base class of an operation handler, registered under `guestkit_worker.handlers`.

    Subclasses set the class attributes and implement `execute`. The supervisor
    validates `payload.data` with `payload_model` (when set) before any fork;
    the child calls `execute` with the validated model (or the raw data).
    """

    name: ClassVar[str] = "handler"
    #: Operation names this handler runs, e.g. ("system.echo",).
    operations: ClassVar[tuple[str, ...]] = ()
    #: Accepted `payload.type` values, e.g. ("system.echo.v1",).
    payload_types: ClassVar[tuple[str, ...]] = ()
    #: The pydantic model of `payload.data`; None accepts any JSON value.
    payload_model: ClassVar[type[BaseModel] | None] = None
    #: Extra capabilities it brings (`disk.qcow2`, `fs.ext4`) and features (`lvm`).
    capabilities: ClassVar[tuple[str, ...]] = ()
    features: ClassVar[tuple[str, ...]] = ()
    #: Whether the operation needs the network; those that don't get none.
    needs_network: ClassVar[bool] = False
    #: True when the handler's own `validate` is plain Python that imports nothing: its jobs
    #: then still fork from the lean forker (see README, "Handlers").
    plain_validate: ClassVar[bool] = False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this handler cannot run on this host (a missing extra), or None when it can."""
        return None

    def __init__(self, settings: Mapping[str, Any]) -> None:
        """Build the handler once per worker; `settings` is the worker's effective config."""
        self.settings = settings

    def validate(self, data: Any) -> Any:
        """Return the validated payload data; raise pydantic.ValidationError or HandlerError.

        Runs in the supervisor before any fork: check paths and roots here, cheaply.
        """
        if self.payload_model is None:
            return data
        return self.payload_model.model_validate(data)

    def input_paths(self, payload: Any) -> list[str]:
        """Files or dirs the job must read (e.g. its disk image); all else is closed to it."""
        return []

    def prepare(self) -> None:
        """Import and warm up what `execute` needs; runs once in the process jobs are forked from."""

    def execute(self, ctx: Context, payload: Any) -> HandlerResult | Any:
        """Run the operation; return a HandlerResult or plain JSON-able data."""
        raise NotImplementedError
