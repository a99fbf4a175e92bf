"""scripts/bench.py runs end to end in quick mode and reports every figure (no timing thresholds)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = (
    "supervisor_rss_mb", "probe_rss_mb", "fork_loop_per_s", "fork_loop_2_per_s", "fork_us",
    "throughput_k1_per_s", "throughput_k2_per_s", "throughput_k4_per_s", "best_concurrency",
    "throughput_best_per_s", "throughput_best_per_s_ratio", "throughput_nofsync_per_s",
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
    assert all(isinstance(t["pass"], bool) and math.isfinite(t["value"]) for t in report["targets"])
    assert "PASS" in proc.stdout or "MISS" in proc.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gkw-bench-")]
