"""Jobs that hang, hog, crash or leave processes behind end clearly; the worker keeps serving."""

from __future__ import annotations

import pytest
from conftest import Worker, job, wait_gone


def _still_serving(w: Worker, tag: str) -> None:
    w.drop(job(f"alive-{tag}"))
    assert w.wait_result(f"alive-{tag}")["status"] == "completed"


@pytest.mark.slow
def test_a_job_that_sleeps_forever_times_out_within_timeout_plus_grace(worker: Worker) -> None:
    worker.drop(job("sleepy", "test.sleep", {}, timeout_seconds=1))
    res = worker.wait_result("sleepy", timeout=20)
    assert res["status"] == "timeout"
    assert res["error"]["code"] == "TIMEOUT"
    assert "wall-clock limit of 1 s" in res["error"]["message"]
    # from its start to its end, as the supervisor timed it (not this test's own delays)
    assert 1.0 <= res["metrics"]["wall_seconds"] < 1 + 1 + 1  # timeout + kill grace + slack
    _still_serving(worker, "timeout")


def test_allocating_2_gib_under_256_mib_ends_as_memory_limit(make_worker) -> None:
    w = make_worker("--memory-limit-mb", "256").start()
    w.drop(job("hog", "test.alloc", {"mb": 2048}))
    res = w.wait_result("hog")
    assert res["status"] == "failed"
    assert res["error"]["code"] == "MEMORY_LIMIT"
    assert res["metrics"]["peak_memory_mb"] < 256 + 64
    _still_serving(w, "memory")


def test_a_spinning_job_ends_as_cpu_limit(worker: Worker) -> None:
    doc = job("spinner", "test.spin", {}, limits={"cpu_seconds": 1})
    worker.drop(doc)
    res = worker.wait_result("spinner", timeout=20)
    assert res["status"] == "failed"
    assert res["error"]["code"] == "CPU_LIMIT"
    assert res["metrics"]["cpu_seconds"] >= 0.9
    _still_serving(worker, "cpu")


@pytest.mark.parametrize("wait", [False, True], ids=["returns", "times-out"])
def test_a_grandchild_ignoring_sigterm_leaves_no_process_behind(worker: Worker, wait: bool) -> None:
    extra = {"timeout_seconds": 2} if wait else {}
    worker.drop(job("parent", "test.grandchild", {"wait": wait}, **extra))
    res = worker.wait_result("parent", timeout=20)
    assert res["status"] == ("timeout" if wait else "completed")
    pid = int((worker.work / "parent" / "grandchild.pid").read_text())
    wait_gone([pid], 5, "the grandchild to die")
    wait_gone([c.pid for c in worker.children()], 5, "the job process to die")
    _still_serving(worker, f"grandchild-{wait}")


def test_a_segfault_gets_a_clear_error(worker: Worker) -> None:
    worker.drop(job("crasher", "test.segv", {}))
    res = worker.wait_result("crasher")
    assert res["status"] == "failed"
    assert res["error"]["code"] == "KILLED"
    assert "SIGSEGV" in res["error"]["message"]
    _still_serving(worker, "segv")


def test_os_exit_3_gets_a_clear_error(worker: Worker) -> None:
    worker.drop(job("quitter", "test.exit", {"code": 3}))
    res = worker.wait_result("quitter")
    assert res["status"] == "failed"
    assert res["error"]["code"] == "EXECUTION_ERROR"
    assert "exited with status 3 without sending a result" in res["error"]["message"]
    _still_serving(worker, "exit")


def test_a_handler_exception_is_execution_error_with_its_message(worker: Worker) -> None:
    worker.drop(job("raiser", "test.raise", {"message": "disk on fire"}))
    res = worker.wait_result("raiser")
    assert res["error"]["code"] == "EXECUTION_ERROR"
    assert res["error"]["message"] == "RuntimeError: disk on fire"
    assert "Traceback" in res["error"]["details"]["traceback"]


def test_job_output_is_captured_per_job_not_in_the_daemon_log(worker: Worker) -> None:
    worker.drop(job("chatty", "test.print", {}))
    assert worker.wait_result("chatty")["status"] == "completed"
    assert (worker.work / "chatty" / "stdout.log").read_text() == "hello on stdout\n"
    assert (worker.work / "chatty" / "stderr.log").read_text() == "hello on stderr\n"
    assert "hello on" not in worker.log()
    out = worker.cli("logs", "chatty").stdout
    assert "hello on stdout" in out and "hello on stderr" in out


def test_output_a_handler_did_not_flush_is_still_captured(make_worker) -> None:
    w = make_worker(env={"PYTHONUNBUFFERED": ""}).start()  # block-buffered, as under systemd
    w.drop(job("unflushed", "test.probe", {"actions": [["print", "buffered line"]]}))
    assert w.wait_result("unflushed")["status"] == "completed"
    assert (w.work / "unflushed" / "stdout.log").read_text() == "buffered line\n"
