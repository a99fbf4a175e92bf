"""The sd_notify protocol, stdlib only: tell systemd we are ready, busy, alive or stopping.

Each call sends one datagram of newline-separated ``KEY=VALUE`` fields to ``$NOTIFY_SOCKET`` (a
filesystem path, or ``@name`` for an abstract socket). Without the variable every call is a no-op
that returns False, so the daemon runs the same way outside systemd. Nothing here raises or logs:
the supervisor's loop calls these on every pass and a missing or dead socket must not disturb it.

Only the supervisor (the unit's main process) should call these; with ``NotifyAccess=main``
systemd ignores datagrams from job children anyway.
"""

from __future__ import annotations

import os
import socket
import time

#: Environment variable naming the notification socket.
NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify(*fields: str) -> bool:
    """Send ``fields`` as one notification datagram; True when it was sent, False otherwise.

    Never blocks: a receiver whose queue is full (net.unix.max_dgram_qlen, often 10) costs
    this message, not the supervisor's loop.
    """
    address = _socket_address(os.environ.get(NOTIFY_SOCKET, ""))
    if address is None or not fields:
        return False
    payload = "\n".join(fields).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, socket.MSG_DONTWAIT, address)
    except (OSError, ValueError):
        return False
    return True


def _socket_address(value: str) -> str | None:
    """The AF_UNIX address for a ``$NOTIFY_SOCKET`` value, or None when it is unusable."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # empty, relative, or a transport we do not speak (vsock:…)


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half ``WATCHDOG_USEC``), or None when none are wanted."""
    usec = _positive_int(os.environ.get("WATCHDOG_USEC"))
    if usec is None:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and _positive_int(pid) != os.getpid():
        return None  # the variables were meant for another process (e.g. inherited by a child)
    return usec / 2_000_000


def _positive_int(value: str | None) -> int | None:
    """``value`` as a positive integer, or None when it is absent or not one."""
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    number = int(value)
    return number if number > 0 else None


def _one_line(text: str) -> str:
    """``text`` with line breaks flattened, since a newline would start a new field."""
    return " ".join(text.splitlines())


def ready(status_text: str | None = None) -> bool:
    """Report that start-up is complete and work can be taken, optionally with a status line."""
    if status_text is None:
        return notify("READY=1")
    return notify("READY=1", f"STATUS={_one_line(status_text)}")


def status(text: str) -> bool:
    """Set the free-text status that ``systemctl status`` shows."""
    return notify(f"STATUS={_one_line(text)}")


def stopping(status_text: str | None = None) -> bool:
    """Report that a drain has begun, optionally with a status line."""
    if status_text is None:
        return notify("STOPPING=1")
    return notify("STOPPING=1", f"STATUS={_one_line(status_text)}")


def reloading() -> bool:
    """Report that configuration is being reloaded; send ``ready()`` when done."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")


def watchdog() -> bool:
    """Ping the service watchdog; call it only from a loop that is making progress."""
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """Ask systemd to wait ``seconds`` more before the current start/stop timeout fires."""
    usec = max(0, int(seconds * 1_000_000))
    return notify(f"EXTEND_TIMEOUT_USEC={usec}")
