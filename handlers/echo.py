"""`system.echo` and `test.echo`: returns its payload, reporting progress 0/50/100."""

from __future__ import annotations

from typing import Any

from handlers.base import Context, Handler, HandlerResult


class EchoHandler(Handler):
    """Echoes `payload.data` back; the smoke test of the whole pipeline."""

    name = "echo-handler"
    operations = ("system.echo", "test.echo")
    payload_types = ("system.echo.v1", "test.echo.v1")

    def execute(self, ctx: Context, payload: Any) -> HandlerResult:
        ctx.report_progress("starting", 0, "Starting echo")
        ctx.report_progress("execution", 50, "Running operation")
        data = {"echo": payload, "message": "Echo handler executed successfully"}
        ctx.report_progress("completing", 100, "Echo complete")
        return HandlerResult(data=data)
