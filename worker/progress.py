"""The child-to-supervisor pipe: one orjson object per line, size-capped on both ends."""

from __future__ import annotations

import os
from typing import Any

import orjson

from worker.errors import WorkerError


class MessageTooLarge(WorkerError):
    """Raised when a child sends a line longer than the configured cap."""


class MessageWriter:
    """Child side: frames dicts as JSON lines onto the pipe."""

    def __init__(self, fd: int, cap: int) -> None:
        self.fd = fd
        self.cap = cap

    def send(self, message: dict[str, Any]) -> None:
        """Write one message; raise MessageTooLarge rather than send more than the cap."""
        view = memoryview(self.encode(message))
        while view:
            view = view[os.write(self.fd, view) :]

    def encode(self, message: dict[str, Any]) -> bytes:
        """One message as its line; MessageTooLarge when the line is over the cap."""
        line = orjson.dumps(message, default=str, option=orjson.OPT_NON_STR_KEYS) + b"\n"
        if len(line) > self.cap:
            raise MessageTooLarge(
                f"a {message.get('type', 'message')} message of {len(line)} bytes"
                f" exceeds the limit of {self.cap} bytes"
            )
        return line


class MessageReader:
    """Supervisor side: collects complete lines from a non-blocking pipe."""

    def __init__(self, fd: int, cap: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.cap = cap
        self.eof = False
        self._buf = bytearray()

    def read_available(self) -> list[dict[str, Any]]:
        """Read what the pipe holds now and return the complete messages in it.

        Raises MessageTooLarge when a line grows past the cap; a line that is not
        a JSON object comes back as an `invalid` message.
        """
        while not self.eof:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
                break
            self._buf += chunk
            if len(self._buf) > self.cap and b"\n" not in self._buf:
                raise MessageTooLarge(f"the job sent a line over {self.cap} bytes")
        return self._split()

    def _split(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return out
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if len(line) > self.cap:
                raise MessageTooLarge(f"the job sent a line of {len(line)} bytes, over {self.cap}")
            try:
                msg = orjson.loads(line)
            except orjson.JSONDecodeError:
                msg = None
            out.append(msg if isinstance(msg, dict) else {"type": "invalid", "raw": line[:200]})

    def close(self) -> None:
        """Close the read end."""
        os.close(self.fd)
