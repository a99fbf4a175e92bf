"""`system.sleep`: waits a number of seconds, reporting progress; a job to try cancel,
timeouts and drains with on a live worker."""

from __future__ import annotations

import time
from typing import Any

from handlers.base import Context, Handler, HandlerResult
from worker.errors import HandlerError

MAX_SECONDS = 86400  #: the longest sleep a job may ask for


class SleepHandler(Handler):
    """Sleeps `payload.data.seconds`, with a progress report about once a second."""

    name = "sleep-handler"
    operations = ("system.sleep",)
    payload_types = ("system.sleep.v1",)
    plain_validate = True  # its jobs fork from the lean forker, as echo's do

    def validate(self, data: Any) -> float:
        """The seconds asked for; HandlerError naming the field unless 0 to MAX_SECONDS."""
        if not isinstance(data, dict):
            raise HandlerError(f"field 'payload.data': expected an object such as "
                               f"{{\"seconds\": 60}}, got {data!r:.60}")
        if "seconds" not in data:
            raise HandlerError("field 'payload.data.seconds': required but missing")
        seconds = data["seconds"]
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
                or not 0 <= seconds <= MAX_SECONDS:
            raise HandlerError(f"field 'payload.data.seconds': expected a number from 0 to "
                               f"{MAX_SECONDS}, got {seconds!r}")
        return float(seconds)

    def execute(self, ctx: Context, payload: Any) -> HandlerResult:
        seconds = float(payload)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            ctx.report_progress("execution", int(100 * (seconds - left) / seconds),
                                f"slept {seconds - left:.0f} of {seconds:g} s")
            time.sleep(min(1.0, left))
        ctx.report_progress("completing", 100, f"slept {seconds:g} s")
        return HandlerResult(data={"slept_seconds": seconds})
