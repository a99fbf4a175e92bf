"""Run a command against a private, throwaway systemd-journald; print what it stored as JSON.

Usage (as root): ``unshare --mount --propagation private python journald_ns.py DIR MATCH -- CMD...``

Inside the new mount namespace: a tmpfs over ``/run`` and ``/var/log/journal`` (so nothing of the
host's journal is read or written), a volatile-only journald.conf bound over the host's, then
``systemd-journald`` started with its output in ``DIR/journald.log`` and ``$NOTIFY_SOCKET``
pointing at a socket here, so its ``READY=1`` says when it listens. ``CMD`` runs with that
journald; then ``journalctl --sync`` and ``journalctl -D /run/log/journal -o json -a MATCH``,
whose lines go to stdout. journald is stopped before exiting. Exit status: CMD's, or 90 + step.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

JOURNALD = "/lib/systemd/systemd-journald"
JOURNALD_CONF = """[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitBurst=0
"""


def private_mounts(workdir: Path) -> None:
    """Hide the host's /run and journal directory and its journald.conf behind private copies."""
    conf = workdir / "journald.conf"
    conf.write_text(JOURNALD_CONF)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
    if os.path.isdir("/var/log/journal"):
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/var/log/journal"], check=True)
    if os.path.exists("/etc/systemd/journald.conf"):
        subprocess.run(["mount", "--bind", str(conf), "/etc/systemd/journald.conf"], check=True)
    for path in ("/run/systemd/journal", "/run/log/journal"):
        os.makedirs(path)


def start_journald(workdir: Path) -> subprocess.Popen[bytes]:
    """Start journald and return once it has said READY=1."""
    notify_path = str(workdir / "journald-notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(30)  # an upper bound if journald never gets ready
        with open(workdir / "journald.log", "wb") as log:
            journald = subprocess.Popen(
                [JOURNALD],
                stdin=subprocess.DEVNULL,
                stdout=log,  # never our stdout: journald would hold the caller's pipe open
                stderr=log,
                env={**os.environ, "NOTIFY_SOCKET": notify_path},
            )
        while b"READY=1" not in notify.recv(4096).split(b"\n"):
            pass
    return journald


def main(argv: list[str]) -> int:
    """Set up, run the command, print the matching entries, tear down."""
    workdir, match, separator, *command = argv
    if separator != "--" or not command:
        print(__doc__, file=sys.stderr)
        return 91
    private_mounts(Path(workdir))
    journald = start_journald(Path(workdir))
    try:
        code = subprocess.run(command, stdin=subprocess.DEVNULL).returncode
        subprocess.run(["journalctl", "--sync"], check=True)
        sys.stdout.flush()
        query = ["journalctl", "-D", "/run/log/journal", "-o", "json", "-a", "--no-pager", match]
        subprocess.run(query, check=True)
        return code
    finally:
        journald.terminate()
        journald.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
