"""scripts/bench.py runs end to end in quick mode and reports every figure (no timing thresholds)."""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = (
    "supervisor_rss_mb", "probe_rss_mb", "fork_loop_per_s", "fork_loop_first_per_s",
    "fork_loop_min_per_s", "fork_loop_max_per_s", "fork_loop_2_per_s", "fork_us",
    "disk_create_us", "disk_fsync_us", "disk_dir_fsync_us", "disk_durable_ms",
    "throughput_k1_per_s", "throughput_k2_per_s", "throughput_k4_per_s", "best_concurrency",
    "throughput_best_per_s", "throughput_best_per_s_ratio", "throughput_best_paired_ratio",
    "throughput_nofsync_per_s",
    "cpu_us_per_job", "rss_before_mb", "rss_peak_mb", "rss_after_mb",
    "latency_p50_ms", "latency_p99_ms", "latency_done_p50_ms", "latency_done_p99_ms",
    "inbox_100_per_s", "inbox_10000_per_s", "inbox_10000_per_s_ratio", "inbox_10000_cpu_us_per_job",
    "inbox_10000_scan_s", "inbox_10000_rss_peak_mb", "inbox_10000_rss_after_mb",
    "rss_peak_max_mb", "rss_flat_ratio",
)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_benchmark_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--jobs", "200",
         "--json", str(out), "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=850, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = orjson.loads(out.read_bytes())
    assert report["mode"] == "quick"
    figures = report["figures"]
    assert not [k for k in FIGURES if k not in figures]
    bad = {k: v for k, v in figures.items()
           if not isinstance(v, int | float) or not math.isfinite(v) or v <= 0}
    assert not bad
    assert len(report["targets"]) == 7
    loops = report["details"]["baseline"]["fork_loops"]  # timed first, then before each burst round
    assert len(loops) == 1 + 3 + 1  # quick: one round at k = 1, 2, 4 and one without fsync
    assert figures["fork_loop_per_s"] == statistics.median(loops)
    best = report["details"]["bursts"][str(figures["best_concurrency"])]
    assert figures["throughput_best_paired_ratio"] == best["rate"] / best["fork_loop"]
    assert report["details"]["disk"]["journal"] in (True, False, None)
    machine = report["machine"]  # the interpreter every measured process ran on
    assert machine["python_executable"] == os.path.realpath(sys._base_executable)
    assert machine["libpython"] == "static" or "libpython" in machine["libpython"]
    assert f"at {machine['python_executable']}, libpython {machine['libpython']}" in proc.stderr + proc.stdout
    assert all(isinstance(t["pass"], bool) and math.isfinite(t["value"]) for t in report["targets"])
    assert "PASS" in proc.stdout or "MISS" in proc.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gkw-bench-")]


def _bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(os.geteuid() != 0, reason="loop-mounts two filesystems: needs root (CI is)")
def test_journal_tells_ext4_with_a_journal_from_one_without(tmp_path: Path) -> None:
    bench = _bench_module()
    found = {}
    for name, features in (("with", "has_journal"), ("without", "^has_journal")):
        image, mnt = tmp_path / f"{name}.img", tmp_path / name
        with image.open("wb") as f:
            f.truncate(16 << 20)
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", features, str(image)], check=True)
        mnt.mkdir()
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
        try:
            found[name] = bench.journal(mnt)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    assert found == {"with": True, "without": False}
    assert bench.journal(Path("/proc")) is None
