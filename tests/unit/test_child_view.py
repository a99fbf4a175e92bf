"""What a job's child gets from its zygote and its pickled spec, and which zygote forks it."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from handlers.base import Context, Handler
from worker import landlock, sandbox, syscall_filter
from worker.cgroups import JobCgroup
from worker.child import Order, job_spec, rehearse
from worker.registry import Registry
from worker.spare import Spare, Spares
from worker.supervisor import Supervisor
from worker.zygote import Zygote


def test_a_pickled_cgroup_keeps_what_its_child_joins_and_nothing_else(tmp_path: Path) -> None:
    procs = tmp_path / "cgroup.procs"
    procs.write_text("")
    cg = JobCgroup([tmp_path], tmp_path, None, None, limits_memory=True, procs=(str(procs),))
    child = pickle.loads(pickle.dumps(cg))
    assert (child.procs, child.limits_memory) == ((str(procs),), True)
    assert (child.dirs, child.v2, child.memory_v1, child.pids_v1) == ([], None, None, None)
    child.join()  # writes "0" (this process) to every procs file
    assert procs.read_text() == "0"
    assert cg.v2 == tmp_path  # the supervisor's object is untouched


class _Model(BaseModel):
    n: int


class _Plain(Handler):
    operations = ("t.plain",)


class _Modelled(Handler):
    operations = ("t.model",)
    payload_model = _Model


class _Validating(Handler):
    operations = ("t.validate",)

    def validate(self, data: Any) -> Any:
        return data


class _Prepared(Handler):
    operations = ("t.prepared",)

    def prepare(self) -> None:
        pass


@pytest.mark.parametrize("kind, warm", [(_Plain, False), (_Modelled, True), (_Validating, True),
                                        (_Prepared, True)])
def test_only_a_plain_handler_forks_from_the_lean_forker(kind: type[Handler], warm: bool) -> None:
    registry = Registry()
    registry.add(kind, {})
    [handler] = registry.handlers.values()
    assert registry.needs_warmth(handler) is warm


def test_a_context_takes_str_or_path_and_gives_paths() -> None:
    for workdir, output in (("/w", "/o"), (Path("/w"), Path("/o"))):
        ctx = Context(job_id="j", operation="o", attempt=1, workdir=workdir, output_dir=output,
                      limits={}, settings={"a": 1}, send=lambda _: None)
        assert (ctx.workdir, ctx.output_dir) == (Path("/w"), Path("/o"))
        assert isinstance(ctx.workdir, Path)


def _confined(read: list[str], write: list[str], version: int, anchored: bool,
              probe: list[str]) -> list[bool]:
    """In a forked child: restrict to a ruleset, then try to read each of `probe`."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reported through the pipe
        code = 1
        try:
            from worker import sandbox

            sandbox.prctl(sandbox.PR_SET_NO_NEW_PRIVS, 1)
            landlock.enforce(landlock.ruleset(read, write, version, anchored=anchored), [],
                             version)
            seen = []
            for path in probe:
                try:
                    os.close(os.open(path, os.O_RDONLY))
                    seen.append("1")
                except PermissionError:
                    seen.append("0")
            os.write(w, "".join(seen).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    out = os.read(r, 64).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return [c == "1" for c in out]


@pytest.mark.skipif(landlock.abi() < 1, reason="needs Landlock in the kernel")
def test_anchored_and_unanchored_read_paths_mix_and_a_version_mismatch_opens_them_again(
        tmp_path: Path) -> None:
    version = landlock.abi()
    here = tmp_path / "here"
    here.mkdir()
    (here / "f").write_text("x")
    (tmp_path / "elsewhere").write_text("x")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - its anchors must not stay in the test process
        code = 1
        try:
            landlock.anchor(["/usr"], version)
            probe = ["/usr/bin/env", str(here / "f"), str(tmp_path / "elsewhere")]
            want = [True, True, False]
            ok = (_confined(["/usr", str(here)], [], version, True, probe) == want
                  and _confined([str(here)], [], version, True, probe) == [False, True, False]
                  and _confined(["/usr", str(here)], [], version, False, probe) == want)
            if version > 1:  # anchored for another ABI: the paths are opened again
                landlock.anchor(["/usr"], version - 1)
                ok = ok and _confined(["/usr", str(here)], [], version, True, probe) == want
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_rehearsal_leaves_the_base_environment_and_its_job_gets_only_its_own() -> None:
    pid = os.fork()
    if pid == 0:  # environment changes stay in this child
        code = 1
        try:
            sandbox.base_environment()
            base = sandbox.Plan(workdir="/scratch", output_dir="/out", env={},
                                limits=sandbox.Limits(64, 1, 8, 16, 1))
            rehearse(base)
            assert dict(os.environ) == sandbox.BASE_ENV
            spec = job_spec(base, Order(job_id="j", operation="echo", attempt=2, data={"m": 1},
                                        workdir="/w/j", limits=base.limits,
                                        env={"GUESTKIT_JOB_ID": "j"}, nproc=7, message_cap=9))
            assert (spec.plan.workdir, spec.plan.output_dir, spec.plan.nproc) == ("/w/j", "/out", 7)
            sandbox.scrub_environment(spec.plan.workdir, spec.plan.env)
            assert dict(os.environ) == {**sandbox.BASE_ENV, "HOME": "/w/j", "TMPDIR": "/w/j",
                                        "GUESTKIT_JOB_ID": "j"}
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0


def test_read_paths_below_another_are_left_out_but_a_link_out_of_it_is_kept(tmp_path: Path) -> None:
    (tmp_path / "runtime" / "lib").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runtime" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "runtime-2").mkdir()  # a sibling whose name starts alike: not below
    paths = [str(tmp_path / p) for p in ("runtime/lib", "runtime", "runtime/linked", "runtime-2")]
    assert sandbox.outermost(paths) == tuple(  # the link by its name: a zygote resolves it
        str(tmp_path / p) for p in ("runtime", "runtime-2", "runtime/linked"))
    assert sandbox.outermost(["/", "/usr", "/etc"]) == ("/",)


def _cannot_build(program: bytes) -> Any:
    raise RuntimeError("built in the child")


def _denied_after_load(program: bytes, prepared_only: bool = False) -> int:
    """In a fork: load `program`, then try a denied syscall; the errno it failed with (99:
    the filter was not loaded). With `prepared_only` the child cannot build a program."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            sandbox.prctl(sandbox.PR_SET_NO_NEW_PRIVS, 1)
            if prepared_only:
                syscall_filter._fprog = _cannot_build  # type: ignore[assignment]
            syscall_filter.load(program)
            try:
                sandbox.unshare(sandbox.CLONE_NEWUTS)
                code = 0
            except OSError as e:
                code = e.errno
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_prepared_seccomp_program_and_one_not_prepared_both_deny_what_they_list() -> None:
    prepared = syscall_filter.compile_program()
    other = syscall_filter.compile_program(unix_sockets=False)
    syscall_filter.prepare(prepared, None)  # as a zygote does, before any fork
    assert _denied_after_load(prepared, prepared_only=True) == errno.EPERM  # made ahead
    assert _denied_after_load(other, prepared_only=True) == 99  # would have to be built
    assert _denied_after_load(other) == errno.EPERM


class _Slot:
    """A stand-in job cgroup that counts the starts marked (or fails them, like a removed one)."""

    def __init__(self, fails: bool = False) -> None:
        self.fails = fails
        self.marks = 0

    def mark_start(self) -> None:
        if self.fails:
            raise OSError("the cgroup is gone")
        self.marks += 1


def test_a_spare_s_job_start_is_marked_once_it_waits_never_when_it_is_retired() -> None:
    spares = Spares(host=None, workdirs=None)  # type: ignore[arg-type]  # arrived() uses neither
    slots = [_Slot(), _Slot(), _Slot(fails=True)]
    for token, slot in enumerate(slots):
        spares.coming[token] = Spare(0, -1, -1, slot, False, False, Path("/s"), 1)  # type: ignore[arg-type]
    spares.cap = 1
    spares.arrived(0, 100)  # a free slot wants it: it waits, its job's counters start now
    spares.arrived(1, 101)  # over the cap: retired unused, nothing to mark
    assert [s.marks for s in slots[:2]] == [1, 0]
    assert list(spares.retired) == [101]
    spares.cap = 2
    spares.arrived(2, 102)  # marking fails: it waits all the same (marked at hand-over)
    assert [s.pid for s in spares.waiting] == [100, 102]
    assert [s.started for s in spares.waiting] == [True, False]


def test_a_zygote_replaced_earlier_in_the_same_loop_pass_is_not_read_again() -> None:
    """Its SIGCHLD can be handled before its socket's end of file in one pass: by then it is
    closed and replaced, and its leftover event must be a no-op, not a crash."""
    gone = Zygote("gkw-forker", {}, prepare=False)  # never started: no socket, as once closed
    sup = Supervisor.__new__(Supervisor)  # _on_zygote needs nothing else for a closed zygote
    assert sup._on_zygote(gone) is None
