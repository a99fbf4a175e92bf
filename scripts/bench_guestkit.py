#!/usr/bin/env python3
"""Measure what the guestkit warm-up buys: import cost, cold vs warm per-image time, fork cost.

usage: .venv/bin/python scripts/bench_guestkit.py IMAGES_DIR [ROUNDS]
IMAGES_DIR is the output of scripts/mkimages.sh. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handlers.base import Context  # noqa: E402
from handlers.guestkit_inspect import InspectHandler  # noqa: E402
from handlers.guestkit_profile import ProfileHandler  # noqa: E402

IMAGE = "deb-gpt.qcow2"
COLD = """
import sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
import dissect.target
t1 = time.perf_counter()
from bench_guestkit import run_job
t2 = time.perf_counter()
run_job({op!r}, {images!r}, {out!r})
print(t1 - t0, time.perf_counter() - t2)
"""


def rss_mib() -> float:
    """Resident set size of this process in MiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_job(op: str, images: str, out: str) -> None:
    """One inspect or profile job on the fixture image, as the child runs it."""
    settings = {"image_roots": [images], "output_dir": out}
    handler = InspectHandler(settings) if op == "inspect" else ProfileHandler(settings)
    data: dict[str, Any] = {"image": {"path": f"{images}/{IMAGE}"}}
    if op == "profile":
        data["profiles"] = ["security", "compliance", "hardening"]
    ctx = Context(job_id=f"bench-{os.getpid()}", operation=op, attempt=1, workdir=Path(out),
                  output_dir=Path(out), limits={}, settings={}, send=lambda m: None)
    handler.execute(ctx, handler.validate(data))


def forked(fn: Any, *args: Any) -> float:
    """Wall seconds from fork to reaping a child that runs fn(*args)."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            fn(*args)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return time.perf_counter() - t0


def median_ms(values: list[float]) -> float:
    """The median of `values` (seconds) in milliseconds."""
    return round(statistics.median(values) * 1000, 1)


def main() -> None:
    """Run every measurement and print them as JSON."""
    images, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10
    out = tempfile.mkdtemp(prefix="bench-guestkit-")
    result: dict[str, Any] = {"image": IMAGE}
    for op in ("inspect", "profile"):
        cold = [subprocess.run([sys.executable, "-c", COLD.format(root=str(ROOT / "scripts"),
                                op=op, images=images, out=out)], capture_output=True, text=True,
                               check=True, cwd=ROOT).stdout.split() for _ in range(3)]
        result["import_dissect_target_ms"] = median_ms([float(c[0]) for c in cold])
        result[f"cold_{op}_ms"] = median_ms([float(c[1]) for c in cold])
    result["fork_bare_ms"] = median_ms([forked(lambda: None) for _ in range(rounds)])
    result["rss_before_warm_up_mib"] = round(rss_mib(), 1)
    t0 = time.perf_counter()
    InspectHandler({}).prepare()
    result["warm_up_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    result["rss_after_warm_up_mib"] = round(rss_mib(), 1)
    result["fork_warm_ms"] = median_ms([forked(lambda: None) for _ in range(rounds)])
    for op in ("inspect", "profile"):
        result[f"warm_{op}_ms"] = median_ms([forked(run_job, op, images, out)
                                             for _ in range(rounds)])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
