"""Once a pass has made its results durable and nothing waits to run, the supervisor gives
up its CPU before it prepares for the next job: whoever waits for a result runs first."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

from conftest import idle_spares, job, wait_until

#: The supervisor's calls that matter here: a job archived (rename into done/), the CPU given
#: up, a spare asked of the forker.
TRACED = "trace=rename,sched_yield,sendmsg"


def _trace(pid: int, out: Path) -> subprocess.Popen[str]:
    """strace the supervisor (not its children) into `out`; return once it is attached."""
    tracer = subprocess.Popen(["strace", "-p", str(pid), "-e", TRACED, "-o", str(out)],
                              stderr=subprocess.PIPE, text=True)
    assert tracer.stderr is not None
    line = tracer.stderr.readline()
    assert "attached" in line, line
    return tracer


def _calls(out: Path) -> list[str]:
    """The traced calls in order, each as its name and, for a rename, its destination dir."""
    calls = []
    for line in out.read_text().splitlines():
        if m := re.match(r"rename\(\"[^\"]*\", \"([^\"]*)/[^/\"]*\"\)", line):
            calls.append(f"rename {Path(m.group(1)).name}")
        elif m := re.match(r"(sched_yield|sendmsg)\(", line):
            calls.append(m.group(1))
    return calls


def test_after_archiving_the_supervisor_yields_before_asking_for_a_spare(
        make_worker, tmp_path: Path) -> None:
    w = make_worker("--max-concurrent", "1").start()
    assert w.proc is not None
    pid = w.proc.pid
    used = wait_until(lambda: idle_spares(pid), [w.work], 20, "a spare waiting")
    out = tmp_path / "supervisor.trace"
    tracer = _trace(pid, out)
    try:
        w.drop(job("yields"))
        assert w.wait_result("yields")["status"] == "completed"
        wait_until(lambda: (w.jobs / "done" / "yields.json").exists(), [w.jobs / "done"], 20,
                   "the job archived")
        # its replacement, asked of the forker after the archive, is boxed and waiting
        wait_until(lambda: [p for p in idle_spares(pid) if p not in used], [w.work], 20,
                   "a new spare waiting")
    finally:
        tracer.send_signal(signal.SIGINT)  # strace detaches and writes out what it holds
        tracer.wait(20)
    calls = _calls(out)
    after = calls[calls.index("rename done"):]
    assert "sched_yield" in after, calls
    assert "sendmsg" in after[after.index("sched_yield"):], calls
    # archiving ends with its status parked; nothing is asked of the forker before the yield
    assert set(after[1:after.index("sched_yield")]) <= {"rename .parked"}, calls
