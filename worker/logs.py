"""The daemon's log output: journald-native fields, human lines, or JSON lines.

The daemon logs with stdlib :mod:`logging` under the ``guestkit`` logger and passes job fields as
``extra={"job_id": ..., "operation": ..., "state": ..., "attempt": ..., "worker_id": ...}`` (any
subset). :func:`setup_logging` installs one handler on the root logger in one of four formats:

``human``
    ``2026-11-27 14:00:00 INFO [test-job-123] execution - Running operation (50%)`` on stderr:
    the job id in brackets when the record has one; the caller writes the rest of the message.
``json``
    One orjson object per line on stderr: ``ts`` (UTC, ISO 8601, milliseconds), ``level``,
    ``logger``, ``msg``, the job fields that are present, and ``exc`` for a traceback.
``journal``
    One native-protocol datagram per record to ``/run/systemd/journal/socket`` (or
    ``$GUESTKIT_JOURNAL_SOCKET``) with ``MESSAGE``, ``PRIORITY``, ``SYSLOG_IDENTIFIER``,
    ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC``, ``GUESTKIT_LOGGER`` and ``GUESTKIT_JOB_ID``,
    ``GUESTKIT_OPERATION``, ``GUESTKIT_STATE``, ``GUESTKIT_ATTEMPT``, ``GUESTKIT_WORKER_ID``,
    so ``journalctl GUESTKIT_JOB_ID=<id>`` finds one job's story. (Never ``JOB_ID``: systemd
    writes its own job numbers under that name.) A record too big for one datagram goes in a
    sealed memfd, as journald allows. When the socket cannot be reached the record is written to
    stderr with a ``<N>`` syslog prefix on every line, which journald's stream reader (and
    ``systemd-cat --level-prefix=true``) turns back into the right priority.
``auto`` (the default) picks, in order:
    1. ``journal`` when ``$JOURNAL_STREAM`` names the device and inode of our stderr: systemd
       sets it exactly when stderr is connected to the journal, so the native protocol reaches
       the same place with the fields intact;
    2. ``human`` otherwise. In particular stderr redirected to a file or a pipe (even on a host
       where journald runs) keeps its human lines: an operator who redirected the output wants
       it there, not silently in the journal. Ask for ``journal`` explicitly to send there.

Third-party loggers stay at WARNING whatever ``level`` says; the ``guestkit`` tree gets
``level``. No handler here raises into the caller: a record that cannot be written anywhere
is dropped. Calling :func:`setup_logging` again replaces the handler (the SIGHUP reopen).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import logging
import os
import socket
import struct
import sys
import time
import traceback
from typing import IO, Any

import orjson

from worker.errors import ConfigError

#: Root of the daemon's logger names.
LOGGER_NAME = "guestkit"
#: The formats ``setup_logging`` accepts.
FORMATS = ("auto", "human", "json", "journal")
#: The levels ``setup_logging`` accepts, by name.
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
#: Record attributes (from ``extra=``) that carry job context, and their journal field names.
JOB_FIELDS = {
    "job_id": "GUESTKIT_JOB_ID",
    "operation": "GUESTKIT_OPERATION",
    "state": "GUESTKIT_STATE",
    "attempt": "GUESTKIT_ATTEMPT",
    "worker_id": "GUESTKIT_WORKER_ID",
}
#: journald's native socket.
JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: Environment variable that overrides ``JOURNAL_SOCKET`` (tests, containers).
JOURNAL_SOCKET_ENV = "GUESTKIT_JOURNAL_SOCKET"
#: ``SYSLOG_IDENTIFIER`` of every journal entry.
SYSLOG_IDENTIFIER = "guestkit-worker"
#: Seconds a journal send may block before the record goes to stderr instead.
JOURNAL_SEND_TIMEOUT = 1.0
#: Seconds after a failed journal send during which records go straight to stderr, so a stuck
#: or absent journald costs the loop one timeout, not one per line.
JOURNAL_RETRY_AFTER = 5.0

_HUMAN_DATEFMT = "%Y-%m-%d %H:%M:%S"
_installed: logging.Handler | None = None  # the handler setup_logging put on the root logger
_MEMFD_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def syslog_priority(levelno: int) -> int:
    """The syslog priority (0-7) for a logging level number."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno > logging.INFO:
        return 5  # a custom level between INFO and WARNING reads as "notice"
    if levelno >= logging.INFO:
        return 6
    return 7


def job_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The job fields (``job_id``, ``operation``, ...) a record carries, in a fixed order."""
    fields = {}
    for name in JOB_FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            fields[name] = value
    return fields


def _job_prefix(record: logging.LogRecord) -> str:
    """``"[job-id] "`` when the record names a job, else ``""``."""
    job_id = getattr(record, "job_id", None)
    return f"[{job_id}] " if job_id is not None else ""


#: Control characters, as \xNN escapes: what a job or a file name puts in a message (a
#: newline, a terminal escape) must not start a line of its own or repaint the terminal.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {
    0x2028: "\\u2028", 0x2029: "\\u2029"}  # line and paragraph separators


def _message_with_traceback(record: logging.LogRecord, formatter: logging.Formatter,
                            one_line: bool = False) -> str:
    """The record's message (on one line, control characters escaped, when `one_line`), its
    job prefix, and any traceback or stack below it."""
    message = record.getMessage()
    if one_line and not message.isprintable():  # rare: most lines are printable as they are
        message = message.translate(_CONTROLS)
    text = _job_prefix(record) + message
    if record.exc_info:
        text += "\n" + formatter.formatException(record.exc_info)
    if record.stack_info:
        text += "\n" + formatter.formatStack(record.stack_info)
    return text


class HumanFormatter(logging.Formatter):
    """Formats ``2026-11-27 14:00:00 INFO [job-id] message`` (plus any traceback): one line
    per record, whatever its message holds, as on a terminal or in a plain log file."""

    def __init__(self) -> None:
        super().__init__(datefmt=_HUMAN_DATEFMT)

    def format(self, record: logging.LogRecord) -> str:
        """The record as one human line (more when it carries a traceback)."""
        stamp = self.formatTime(record, self.datefmt)
        return f"{stamp} {record.levelname} {_message_with_traceback(record, self, True)}"


class JsonFormatter(logging.Formatter):
    """Formats one JSON object per record: ts, level, logger, msg, job fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single JSON line (no trailing newline)."""
        doc: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(job_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(doc, default=str).decode()


def _iso_utc(created: float) -> str:
    """``created`` as ``2026-11-27T14:00:00.123Z``."""
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class StderrHandler(logging.Handler):
    """Writes formatted records to the current ``sys.stderr``; never raises."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write one formatted record and a newline."""
        try:
            _write_stderr(self.format(record) + "\n")
        except Exception:
            _last_resort(record)


class JournalHandler(logging.Handler):
    """Sends records to journald over its native protocol; stderr with ``<N>`` prefixes if not."""

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        self.path = path or os.environ.get(JOURNAL_SOCKET_ENV) or JOURNAL_SOCKET
        self._sock: socket.socket | None = None
        self._pid = -1
        self._text = logging.Formatter()
        self._retry_at = 0.0  # time.monotonic() before which the journal is not tried

    def emit(self, record: logging.LogRecord) -> None:
        """Send one record; on any failure write it to stderr instead."""
        try:
            message = _message_with_traceback(record, self._text)
            payload = journal_payload(record, message)
        except Exception:
            _last_resort(record)
            return
        if time.monotonic() < self._retry_at:
            self._fallback(record, message)
            return
        try:
            self._send(payload)
        except Exception:
            self._retry_at = time.monotonic() + JOURNAL_RETRY_AFTER
            self._fallback(record, message)

    def _send(self, payload: bytes) -> None:
        """One datagram to the journal, or a sealed memfd when it is too big for one."""
        sock = self._socket()
        try:
            sock.sendto(payload, self.path)
        except OSError as err:
            if err.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            _send_memfd(sock, self.path, payload)

    def _socket(self) -> socket.socket:
        """The sending socket, made anew after a fork so parent and child never share one."""
        if self._sock is None or self._pid != os.getpid():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.settimeout(JOURNAL_SEND_TIMEOUT)
            self._sock, self._pid = sock, os.getpid()
        return self._sock

    def _fallback(self, record: logging.LogRecord, message: str) -> None:
        """Write ``message`` to stderr with the record's ``<N>`` prefix on every line."""
        prefix = f"<{syslog_priority(record.levelno)}>"
        lines = message.splitlines() or [""]
        try:
            _write_stderr("".join(f"{prefix}{line}\n" for line in lines))
        except Exception:
            _last_resort(record)

    def close(self) -> None:
        """Close the sending socket."""
        if self._sock is not None and self._pid == os.getpid():
            self._sock.close()
        self._sock = None
        super().close()


def journal_payload(record: logging.LogRecord, message: str) -> bytes:
    """The native-protocol datagram for ``record`` with ``message`` as ``MESSAGE``."""
    fields: list[tuple[str, object]] = [
        ("MESSAGE", message),
        ("PRIORITY", syslog_priority(record.levelno)),
        ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
        ("CODE_FILE", record.pathname),
        ("CODE_LINE", record.lineno),
        ("CODE_FUNC", record.funcName),
        ("GUESTKIT_LOGGER", record.name),
    ]
    fields.extend((JOB_FIELDS[name], value) for name, value in job_fields(record).items())
    return b"".join(journal_field(name, value) for name, value in fields)


def journal_field(name: str, value: object) -> bytes:
    """One field: ``NAME=value\\n``, or the length-prefixed binary form when value has a newline."""
    data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
    key = name.encode("ascii")
    if b"\n" in data:
        return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key + b"=" + data + b"\n"


def _send_memfd(sock: socket.socket, path: str, payload: bytes) -> None:
    """Pass ``payload`` to journald in a sealed memfd, for records over the datagram limit."""
    fd = os.memfd_create("guestkit-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, payload)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _MEMFD_SEALS)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
        sock.sendmsg([], rights, 0, path)
    finally:
        os.close(fd)


def _write_stderr(text: str) -> None:
    """Write ``text`` to whatever ``sys.stderr`` is now; silently nothing when there is none."""
    stream: IO[str] | None = sys.stderr
    if stream is None:
        return
    stream.write(text)
    stream.flush()


def _last_resort(record: logging.LogRecord) -> None:
    """Write a bare line about a record that could not be formatted or written; never raise."""
    try:
        line = f"<3>guestkit-worker: unloggable record {record.name}:{record.lineno}"
        line += f" {record.msg!r}: {traceback.format_exc(limit=1).splitlines()[-1]}\n"
        os.write(2, line.encode("utf-8", "replace"))
    except Exception:
        pass  # nowhere left to report it


def resolve_format(fmt: str = "auto") -> str:
    """The concrete format for ``fmt``: ``auto`` becomes ``journal`` or ``human`` (see above)."""
    if fmt not in FORMATS:
        raise ConfigError(f"log_format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    return "journal" if stderr_is_journal() else "human"


def stderr_is_journal() -> bool:
    """True when ``$JOURNAL_STREAM`` names the device and inode of file descriptor 2."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def _level_number(level: str) -> int:
    """The logging level number for a level name, or ConfigError naming it."""
    try:
        return LEVELS[level.lower()]
    except KeyError:
        raise ConfigError(f"log_level: {level!r} is not one of {', '.join(LEVELS)}") from None


def make_handler(fmt: str) -> logging.Handler:
    """A fresh handler for a concrete format (``human``, ``json`` or ``journal``)."""
    if fmt == "journal":
        return JournalHandler()
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    return handler


def setup_logging(fmt: str = "auto", level: str = "info") -> None:
    """Route all logging to one handler in format ``fmt``; ``guestkit.*`` logs at ``level``."""
    global _installed
    number = _level_number(level)
    handler = make_handler(resolve_format(fmt))
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
        _installed.close()
    root.addHandler(handler)
    _installed = handler
    root.setLevel(logging.WARNING)
    logging.getLogger(LOGGER_NAME).setLevel(number)
    logging.raiseExceptions = False  # the stdlib's own error reporting must not reach the loop
