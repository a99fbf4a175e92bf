"""forkhooks: the hooks held back are really skipped by children, and run again where needed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import PLUGINS

# Each case runs in a fresh interpreter: `defer` must come before `threading` is imported.
PRELUDE = """
import os
from worker import forkhooks
forkhooks.defer()
import logging, threading
from gkw_testhandlers import threads_after_fork as threads_in_child
"""


def _run(body: str) -> str:
    code = PRELUDE + textwrap.dedent(body)
    path = os.pathsep.join(str(p) for p in (PLUGINS, PLUGINS.parent.parent))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_single_threaded_process_holds_back_threadings_and_loggings_hooks() -> None:
    # held back for real: a thread started afterwards is still "alive" in a child
    assert _run("print(forkhooks.settle(), threads_in_child())") == "2 2"


def test_restore_makes_a_childs_own_forks_run_the_hooks() -> None:
    assert _run("""
        forkhooks.settle()
        forkhooks.restore()
        print(threads_in_child())
    """) == "1"


def test_with_a_second_thread_at_settle_the_hooks_are_registered_after_all() -> None:
    assert _run("""
        stop = threading.Event()
        t = threading.Thread(target=stop.wait)
        t.start()
        held = forkhooks.settle()
        stop.set()
        t.join()
        print(held, threads_in_child())
    """) == "0 1"


def test_other_modules_hooks_are_registered_as_usual() -> None:
    assert _run("""
        os.register_at_fork(after_in_child=lambda: os.write(1, b"ran"))
        forkhooks.settle()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    """) == "ran"
