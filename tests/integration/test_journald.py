"""Job log lines reach a real systemd-journald with their fields and priorities intact."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("journald_ns.py")
JOURNALD = "/lib/systemd/systemd-journald"
REPO = Path(__file__).resolve().parents[2]
BIG = 300 * 1024  # over the datagram limit: travels in a sealed memfd

LOGGER_SCRIPT = """
import logging, os, sys
from worker.logs import setup_logging

job_id, pid_file = sys.argv[1], sys.argv[2]
with open(pid_file, "w") as out:
    out.write(str(os.getpid()))
setup_logging("journal", "debug")
log = logging.getLogger("guestkit.execution")
job = {"job_id": job_id, "operation": "guestkit.inspect", "state": "running", "attempt": 1,
       "worker_id": "w-it"}
log.info("execution - Running operation (50%)", extra=job)
log.debug("heartbeat %d", 7, extra=job)
log.warning("transient failure, will retry", extra={**job, "state": "retrying", "attempt": 2})
try:
    raise RuntimeError("disk image truncated")
except RuntimeError:
    log.exception("handler crashed", extra={**job, "state": "failed"})
log.critical("giving up", extra={**job, "state": "failed"})
log.info("x" * BIG, extra=job)
log.info("someone else's job", extra={**job, "job_id": "other-" + job_id})
log.info("a line about no job at all")
"""


def _missing() -> str | None:
    """Why this machine cannot run the test, or None when it can."""
    for tool in ("unshare", "journalctl", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.access(JOURNALD, os.X_OK):
        return f"{JOURNALD} is not installed (Debian package systemd)"
    if os.geteuid() != 0:
        return "a private mount namespace with a tmpfs /run needs root"
    return None


def _text(value: Any) -> str:
    """A journal JSON field value as text (journalctl prints some as byte arrays)."""
    return bytes(value).decode() if isinstance(value, list) else str(value)


@pytest.fixture(scope="module")
def journal(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, int, list[dict[str, Any]]]:
    """(job id, logger pid, the journal entries whose GUESTKIT_JOB_ID is that id)."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("journald")
    job_id = f"it-{uuid.uuid4().hex[:12]}"
    pid_file = workdir / "logger.pid"
    command = [
        "unshare", "--mount", "--propagation", "private",
        sys.executable, str(DRIVER), str(workdir), f"GUESTKIT_JOB_ID={job_id}",
        "--", sys.executable, "-c", LOGGER_SCRIPT.replace("BIG", str(BIG)), job_id, str(pid_file),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, timeout=120)
    journald_log = (workdir / "journald.log").read_text(errors="replace")
    assert done.returncode == 0, (done.stderr.decode(errors="replace"), journald_log)
    entries = [orjson.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return job_id, int(pid_file.read_text()), entries


def test_every_line_of_the_job_is_found_and_only_those(
    journal: tuple[str, int, list[dict[str, Any]]],
) -> None:
    job_id, _, entries = journal
    messages = [_text(e["MESSAGE"]).split("\n")[0] for e in entries]
    assert messages == [
        f"[{job_id}] execution - Running operation (50%)",
        f"[{job_id}] heartbeat 7",
        f"[{job_id}] transient failure, will retry",
        f"[{job_id}] handler crashed",
        f"[{job_id}] giving up",
        f"[{job_id}] " + "x" * BIG,
    ]


def test_priorities_follow_the_levels(journal: tuple[str, int, list[dict[str, Any]]]) -> None:
    _, _, entries = journal
    assert [e["PRIORITY"] for e in entries] == ["6", "7", "4", "3", "2", "6"]


def test_job_fields_are_indexed(journal: tuple[str, int, list[dict[str, Any]]]) -> None:
    job_id, pid, entries = journal
    for entry in entries:
        assert entry["GUESTKIT_JOB_ID"] == job_id
        assert entry["GUESTKIT_OPERATION"] == "guestkit.inspect"
        assert entry["GUESTKIT_WORKER_ID"] == "w-it"
        assert entry["GUESTKIT_LOGGER"] == "guestkit.execution"
        assert entry["SYSLOG_IDENTIFIER"] == "guestkit-worker"
        assert entry["_TRANSPORT"] == "journal"
        assert entry["_PID"] == str(pid)
        assert "JOB_ID" not in entry
    states = [(e["GUESTKIT_STATE"], e["GUESTKIT_ATTEMPT"]) for e in entries]
    assert states[2:5] == [("retrying", "2"), ("failed", "1"), ("failed", "1")]


def test_traceback_survives_in_one_entry(journal: tuple[str, int, list[dict[str, Any]]]) -> None:
    _, _, entries = journal
    message = _text(entries[3]["MESSAGE"]).split("\n")
    assert message[1] == "Traceback (most recent call last):"
    assert message[-1] == "RuntimeError: disk image truncated"


def test_code_location_is_recorded(journal: tuple[str, int, list[dict[str, Any]]]) -> None:
    _, _, entries = journal
    assert entries[0]["CODE_FILE"] == "<string>"
    assert entries[0]["CODE_FUNC"] == "<module>"
    assert int(entries[0]["CODE_LINE"]) > 1
