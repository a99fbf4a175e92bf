"""The `guestkit-worker` command: the daemon and its client commands; the only place that exits."""

from __future__ import annotations

import functools
import logging
import os
import select
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from worker import __version__, config, fsutil, isolation
from worker.errors import ConfigError, JobRejected, UnsafeFile, WorkerError
from worker.intake import Intake
from worker.registry import Registry
from worker.spec import (
    JOB_ID_RE,
    JOB_ID_TEXT,
    ambiguous,
    describe_ambiguity,
    dumps,
    dumps_pretty,
    loads,
    parse_job,
)
from worker.spool import Spool, original_name
from worker.watch import Watch

TERMINAL = ("completed", "failed", "timeout", "cancelled")


def _spool_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options every command shares: where the config and the spool are."""
    opts = [
        click.option("--config", "config_file", type=click.Path(path_type=Path),
                     help="TOML config file (default /etc/guestkit-worker/worker.toml if present)"),
        click.option("--jobs-dir", type=click.Path(path_type=Path), help="The spool directory"),
        click.option("--results-dir", type=click.Path(path_type=Path), help="Results directory"),
        click.option("--work-dir", type=click.Path(path_type=Path), help="Per-job work dirs"),
    ]
    return functools.reduce(lambda f, o: o(f), reversed(opts), fn)


def _offer_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What the worker offers jobs (supervise serves with them, validate checks against
    them): its pool, output dir, image roots, features and labels."""
    opts = [
        click.option("--pool", "-p", help="Worker pool served (default: default)"),
        click.option("--output-dir", type=click.Path(path_type=Path),
                     help="Where outputs may go"),
        click.option("--image-root", "image_roots", multiple=True,
                     type=click.Path(path_type=Path),
                     help="A directory disk images may be read from (repeatable)"),
        click.option("--feature", "features", multiple=True,
                     help="A feature this host offers (repeatable)"),
        click.option("--label", "labels", multiple=True, callback=_labels,
                     help="KEY=VALUE: a label routing.affinity may ask for (repeatable)"),
    ]
    return functools.reduce(lambda f, o: o(f), reversed(opts), fn)


def _redis_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--redis-url: work against the shared Redis queue instead of the local spool."""
    return click.option("--redis-url", help="Use the Redis queue at this URL (redis://host:port/db); "
                        "also implied by transport = \"redis\" in the config")(fn)


def _labels(_ctx: click.Context, _param: click.Parameter,
            values: tuple[str, ...]) -> dict[str, str] | None:
    """--label KEY=VALUE options as a dict (None when there are none: the config decides)."""
    try:
        return config.key_values(values) or None
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _job_id(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A JOB_ID argument, refused unless it is a valid job id (it names files in the spool)."""
    if value is not None and not JOB_ID_RE.fullmatch(value):
        raise click.BadParameter(f"expected {JOB_ID_TEXT}, got {value!r}")
    return value


def _settings(config_file: Path | None, **flags: Any) -> tuple[config.Settings, dict[str, str]]:
    return config.load(flags, config_file)  # a ConfigError is one line (see _Commands)


class _Commands(click.Group):
    """The command group: a bad setting, or an OSError a command meets (a spool path that is
    a file, a directory it may not read), is reported as one error line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # `status | head`: no traceback, and the status of a
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # command a
            sys.exit(128 + signal.SIGPIPE)  # SIGPIPE ended, as with any other tool
        except (OSError, ConfigError) as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="guestkit-worker")
def main() -> None:
    """Run VM-operation jobs from a spool, each in a fresh sandboxed child process."""


@main.command()
@_spool_options
@click.option("--worker-id", "-w", help="This worker's name (default: the host name)")
@_offer_options
@click.option("--isolation", multiple=True, type=click.Choice(config.ISOLATION_LAYERS),
              help="An optional isolation layer to apply (repeatable; default: all)")
@click.option("--user", help="Job user when run as root: auto, a name, or root")
@click.option("--max-concurrent", "-m", type=int, help="Jobs running at once (default 4)")
@click.option("--shutdown-timeout", type=float, help="Drain time on SIGTERM, seconds (30)")
@click.option("--kill-grace", type=float, help="Seconds from SIGTERM to SIGKILL (5)")
@click.option("--memory-limit-mb", type=int, help="Default and cap of job memory (2048)")
@click.option("--cpu-limit-seconds", type=int, help="Default and cap of job CPU seconds")
@click.option("--log-format", type=click.Choice(["auto", "human", "json", "journal"]))
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--metrics-addr", help="host:port of /metrics and /healthz ('' disables)")
@click.option("--no-fsync", "fsync", flag_value=False, default=None,
              help="Skip fsync of results and state (faster, not crash-durable)")
@click.option("--spares/--no-spares", default=None,
              help="Keep a boxed child waiting per free slot (default: on)")
@click.option("--transport", type=click.Choice(["spool", "redis"]),
              help="Also take jobs from a shared Redis stream (default: spool only)")
@_redis_option
def supervise(config_file: Path | None, **flags: Any) -> None:
    """Run the supervisor in the foreground until SIGTERM or SIGINT (then drain)."""
    from worker.logs import setup_logging
    from worker.supervisor import Supervisor
    from worker.transports import Remote

    for many in ("image_roots", "features", "isolation"):
        flags[many] = list(flags[many]) or None
    settings, _ = _settings(config_file, **flags)
    setup_logging(settings.log_format, settings.log_level)
    registry = Registry.load(settings.model_dump(mode="json"))
    remote: Remote | None = None
    if settings.transport == "redis":  # imported only when used: it costs the forking process memory
        from worker.transports.redis import RedisRemote

        remote = RedisRemote(settings)
    sup = Supervisor(settings, registry, __version__,
                     reload=lambda: config.load(flags, config_file)[0], remote=remote)
    try:
        code = sup.run()
    except WorkerError as e:  # a lock held, a bad setting, a busy port: say so plainly
        logging.getLogger("guestkit").critical("cannot start: %s", e)
        raise click.ClickException(str(e)) from None
    except Exception:  # one journal entry with the whole traceback, at PRIORITY 2
        logging.getLogger("guestkit").critical("supervisor failed", exc_info=True)
        sys.exit(1)
    sys.exit(code)


def _queue(config_file: Path | None, redis_url: str | None,
           **flags: Any) -> tuple[config.Settings, Any]:
    """The settings, and a Redis queue client when --redis-url or the config asks for one."""
    settings, _ = _settings(config_file, redis_url=redis_url, **flags)
    if redis_url is None and settings.transport != "redis":
        return settings, None
    from worker.transports.redis import Queue

    return settings, Queue(settings)


def _job_document(file: Path | None, operation: str | None, data: str | None,
                  payload_type: str | None) -> dict[str, Any]:
    if file is not None:
        if operation is not None or data is not None or payload_type is not None:
            raise click.UsageError("give a job FILE or --operation/--data/--payload-type, "
                                   "not both")
        try:
            doc = _exact_json(file.read_bytes(), str(file))
        except OSError as e:
            raise click.ClickException(f"{file}: {e}") from None
        if not isinstance(doc, dict):
            raise click.ClickException(f"{file}: expected a JSON object")
        return doc
    if operation is None:
        raise click.UsageError("give a job FILE or --operation (with --data)")
    payload = _exact_json((data or "{}").encode(), "--data")
    return {"version": "1.0", "kind": "VMOperation", "operation": operation,
            "payload": {"type": payload_type or f"{operation}.v1", "data": payload}}


def _exact_json(raw: bytes, label: str) -> Any:
    """`raw` decoded, or a ClickException naming `label` (no integer may change on the way)."""
    try:
        value = loads(raw)
    except ValueError as e:
        raise click.ClickException(f"{label}: not valid JSON: {e}") from None
    if (odd := ambiguous(raw, value)) is not None:
        raise click.ClickException(f"{label}: {describe_ambiguity(*odd)}")
    return value


@main.command()
@_spool_options
@click.argument("file", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--operation", "-o", help="Operation for a job built from flags, e.g. system.echo")
@click.option("--data", "-d", help="payload.data as JSON (with --operation)")
@click.option("--payload-type", help="payload.type (default <operation>.v1)")
@click.option("--job-id", callback=_job_id, help="Job id (default: the file's, or a new one)")
@click.option("--idempotency-key", help="execution.idempotency_key")
@click.option("--timeout", type=int, help="execution.timeout_seconds")
@click.option("--priority", type=click.IntRange(1, 10), help="execution.priority (1-10)")
@click.option("--max-attempts", type=int, help="execution.max_attempts")
@click.option("--wait", is_flag=True, help="Follow progress and print the result")
@click.option("--wait-timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="With --wait (implied): give up following after SECONDS, exit 124; the job "
              "stays submitted")
@click.option("--pool", help="With Redis: the pool whose stream gets the job (default: the job's "
              "routing.worker_pool, else the configured pool)")
@_redis_option
def submit(config_file: Path | None, jobs_dir: Path | None, results_dir: Path | None,
           work_dir: Path | None, file: Path | None, operation: str | None, data: str | None,
           payload_type: str | None, job_id: str | None, idempotency_key: str | None,
           timeout: int | None, priority: int | None, max_attempts: int | None,
           wait: bool, wait_timeout: float | None, pool: str | None, redis_url: str | None) -> None:
    """Submit a job from FILE or from --operation/--data; --wait follows it to its result."""
    until = None if wait_timeout is None else time.monotonic() + wait_timeout
    wait = wait or until is not None
    settings, queue = _queue(config_file, redis_url, jobs_dir=jobs_dir, results_dir=results_dir,
                             work_dir=work_dir)
    doc = _job_document(file, operation, data, payload_type)
    doc["job_id"] = job_id or doc.get("job_id") or f"job-{uuid.uuid4().hex[:20]}"
    ex = doc.setdefault("execution", {})
    for key, value in (("idempotency_key", idempotency_key), ("timeout_seconds", timeout),
                       ("priority", priority), ("max_attempts", max_attempts)):
        if value is not None:
            ex[key] = value
    raw = dumps_pretty(doc)
    if len(raw) > settings.max_job_bytes:  # indented where it fits, so that done/ reads well
        raw = dumps(doc)
    if len(raw) > settings.max_job_bytes:
        raise click.ClickException(
            f"job {doc['job_id']!r}: is {len(raw)} bytes as JSON, over the limit of "
            f"{settings.max_job_bytes} bytes (max_job_bytes) that workers take")
    try:
        parse_job(raw, str(file or "--operation"))
    except JobRejected as e:
        raise click.ClickException(e.message) from None
    if queue is not None:
        route: dict[str, Any] = doc["routing"] if isinstance(doc.get("routing"), dict) else {}
        _submit_redis(queue, doc["job_id"], dumps(doc),
                      pool or route.get("worker_pool") or settings.pool, wait, until)
        return
    spool = Spool(settings)
    if spool.has_result(doc["job_id"]):
        raise click.ClickException(
            f"job {doc['job_id']!r} has already run (its result is {spool.result_path(doc['job_id'])}); "
            "a job id is never reused: give another --job-id")
    spool.setup()
    watch = _outcomes(spool) if wait else None  # before the file exists: it may end at once
    try:
        sent = spool.submit(doc["job_id"], raw)
    except FileExistsError:
        raise click.ClickException(
            f"job {doc['job_id']!r} is already waiting in {spool.inbox}") from None
    click.echo(f"submitted {doc['job_id']}")
    _unserved(spool)
    if watch is not None:
        sys.exit(_follow(spool, doc["job_id"], watch, sent, until))


def _redis_call(queue: Any, action: Callable[[], Any]) -> Any:
    """Run one request against Redis; its refusals and outages become clear messages."""
    import redis

    from worker.transports.redis import QueueError

    try:
        return action()
    except QueueError as e:
        raise click.ClickException(str(e)) from None
    except (redis.RedisError, OSError) as e:
        raise click.ClickException(
            f"redis at {queue.settings.redis_url} is unreachable: {e}") from None


def _submit_redis(queue: Any, job_id: str, raw: bytes, pool: str, wait: bool,
                  until: float | None) -> None:
    mid = _redis_call(queue, lambda: queue.submit(job_id, raw, pool))
    click.echo(f"submitted {job_id} (message {mid})")
    if wait:
        sys.exit(_redis_call(queue, lambda: _follow_redis(queue, job_id, until)))


def _follow_redis(queue: Any, job_id: str, until: float | None = None) -> int:
    """Show the job's progress from its Redis status until its result exists; print it
    (124: `until`, a monotonic time, came first)."""
    shown = ""
    for st in queue.follow(job_id):
        line = _progress_line(job_id, st)
        if line != shown:
            click.echo(("\r" + line.ljust(78)) if sys.stderr.isatty() else line,
                       nl=not sys.stderr.isatty(), err=True)
        shown = line
        if until is not None and time.monotonic() >= until:
            return _gave_up(job_id, shown)
    return _finish_follow(job_id, queue.result(job_id) or {})


def _gave_up(job_id: str, shown: str) -> int:
    """--wait-timeout passed: say so (the job stays submitted); the exit code of timeout(1)."""
    last = shown.removeprefix(job_id + ": ") or "pending"
    click.echo(("\n" if sys.stderr.isatty() else "") + f"{job_id}: gave up waiting "
               f"(--wait-timeout); the job stays submitted, as last seen: {last}", err=True)
    return 124


def _outcomes(spool: Spool, also: str = "rejected") -> Watch:
    """A watch on where a job's end shows: results/, and `also`: rejected/ (a duplicate gets
    no result) or the cancel requests (a refused one is removed without a result)."""
    watch = Watch()
    watch.add("results", spool.results)
    watch.add(also, spool.rejected if also == "rejected" else spool.cancel_dir)
    return watch


def _follow(spool: Spool, job_id: str, watch: Watch, sent: tuple[int, int],
            until: float | None = None) -> int:
    """Show the job's progress until its result exists, or until the file `sent` (its
    st_dev, st_ino) is rejected; print it; 0 only when completed (124: `until`, a monotonic
    time, came first). Closes `watch` (see `_outcomes`)."""
    shown = ""
    try:
        while not spool.has_result(job_id):
            if until is not None and time.monotonic() >= until:
                return _gave_up(job_id, shown)
            st = spool.read_status(job_id) or {}
            line = _progress_line(job_id, st)
            if line != shown and sys.stderr.isatty():
                click.echo("\r" + line.ljust(78), nl=False, err=True)
            elif line != shown:
                click.echo(line, err=True)
            shown = line
            select.select([watch.fileno()], [], [], 0.25)
            names = [c.name for c in watch.read() if c.where == "rejected"]
            if watch.overflowed:  # events were lost: look at every record for this name
                watch.overflowed = False
                names = [p.name for p in spool.rejected.glob(f"*{job_id}.json.error.json")]
            for name in names:
                if (why := _rejection(spool, name, sent)) is not None:
                    click.echo(f"{job_id}: rejected: {why}", err=True)
                    return 1
    finally:
        watch.close()
    return _finish_follow(job_id, spool.read_result(job_id) or {})


def _rejection(spool: Spool, name: str, sent: tuple[int, int]) -> str | None:
    """The message of rejection record `name` in rejected/ when the file it turned away is
    the one `sent` (another client's file of the same name is not ours), else None."""
    if not name.endswith(".error.json"):
        return None
    try:
        st = os.lstat(spool.rejected / name.removesuffix(".error.json"))
    except OSError:
        return None
    if (st.st_dev, st.st_ino) != sent:
        return None
    return str((spool.rejection(name) or {}).get("message", "(no reason recorded)"))


def _finish_follow(job_id: str, result: dict[str, Any]) -> int:
    """End a followed job: its final state on stderr, the result on stdout; 0 when completed."""
    final = f"{job_id}: {result.get('status', 'unknown')}"
    click.echo(("\r" + final.ljust(78)) if sys.stderr.isatty() else final, err=True)
    click.echo(dumps_pretty(result).decode(), nl=False)
    return 0 if result.get("status") == "completed" else 1


def _progress_line(job_id: str, st: dict[str, Any]) -> str:
    prog = st.get("progress") or {}
    pct = prog.get("percent")
    bar = ""
    if isinstance(pct, int):
        filled = pct * 30 // 100
        bar = f"[{'#' * filled}{'.' * (30 - filled)}] {pct:3d}% "
    state = st.get("state", "pending")
    return f"{job_id}: {state} {bar}{prog.get('phase') or ''} {prog.get('message') or ''}".rstrip()


def _client_spool(config_file: Path | None, **dirs: Any) -> Spool:
    settings, _ = _settings(config_file, **dirs)
    return Spool(settings)


def _watched_spool(config_file: Path | None, **dirs: Any) -> Spool:
    """The spool to show: an error when there is none; a note when no supervisor serves it."""
    spool = _client_spool(config_file, **dirs)
    if not spool.inbox.is_dir():
        what = "Not a directory" if spool.inbox.exists() else "no such directory"
        raise click.ClickException(f"no spool at {spool.inbox}: {what} (see --jobs-dir; by "
                                   "default ./jobs, or a config file's jobs_dir)")
    _unserved(spool)
    return spool


def _rows(spool: Spool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{"job_id": n.removesuffix(".json"), "state": "pending"}
            for n in (spool.inbox_names() if spool.inbox.exists() else [])]
    rows += spool.statuses() if spool.status_dir.exists() else []
    live = {r["job_id"] for r in rows}
    if spool.results.exists():
        for name in sorted(os.listdir(spool.results)):
            jid = name.removesuffix("-result.json")
            if name.endswith("-result.json") and jid not in live:
                res = spool.read_result(jid) or {}
                summary = res.get("execution_summary") or {}
                rows.append({"job_id": jid, "state": res.get("status", "?"),
                             "attempt": summary.get("attempt"),
                             "max_attempts": summary.get("max_attempts"),
                             "detail": (res.get("error") or {}).get("code", "")})
    return rows


def _retry_at(status: dict[str, Any]) -> str | None:
    """'retry at HH:MM:SS' for a job backing off before its next attempt, else None."""
    when = status.get("not_before")
    if not isinstance(when, int | float) or when <= time.time():
        return None
    return f"retry at {time.strftime('%H:%M:%S', time.localtime(when))}"


def _table(rows: list[dict[str, Any]]) -> None:
    click.echo(f"{'JOB_ID':<36} {'STATE':<10} {'PRIO':<4} {'ATTEMPT':<8} {'PROGRESS':<9} DETAIL")
    for r in rows:
        prog = r.get("progress") or {}
        pct = prog.get("percent")
        attempt = f"{r['attempt']}/{r['max_attempts']}" if r.get("attempt") else "-"
        detail = (r.get("waiting_for") or r.get("detail") or _retry_at(r) or prog.get("phase")
                  or ("next free slot" if r.get("state") == "queued" else ""))
        if r.get("stalled"):
            detail = f"STALLED {detail}"
        click.echo(f"{r['job_id']:<36} {r.get('state', '?'):<10} {r.get('priority', '-'):<4} "
                   f"{attempt:<8} {(str(pct) + '%') if pct is not None else '-':<9} {detail}")


@main.command()
@_spool_options
@_redis_option
@click.argument("job_id", required=False, callback=_job_id)
@click.option("--watch", "-W", is_flag=True,
              help="Refresh every second until the job (or every listed job) has ended")
def status(config_file: Path | None, job_id: str | None, redis_url: str | None, watch: bool,
           **dirs: Any) -> None:
    """Show live jobs (pending, queued, running, waiting) and finished ones, or one job."""
    _, queue = _queue(config_file, redis_url, **dirs)
    if queue is not None:
        show = functools.partial(_status_redis, queue, job_id)
    else:
        show = functools.partial(_status_spool, _watched_spool(config_file, **dirs), job_id)
    while True:
        if watch and sys.stdout.isatty():
            click.clear()
        if show() or not watch:
            return
        time.sleep(1.0)  # a person is reading: refresh once a second
        if not sys.stdout.isatty():
            click.echo("")


def _ended(state: object) -> bool:
    return state in TERMINAL


def _unserved(spool: Spool) -> None:
    """Say on stderr when no supervisor serves the spool: nothing shown will move."""
    if spool.server() is None:
        click.echo(f"note: no supervisor serves {spool.inbox} now; its jobs wait for one "
                   "(running ones were stopped with it)", err=True)


def _status_spool(spool: Spool, job_id: str | None) -> bool:
    """Print the spool's jobs (or one job); True when everything shown has ended."""
    if job_id is None:
        rows = _rows(spool)
        _table(rows)
        return all(_ended(r.get("state")) for r in rows)
    st = spool.read_status(job_id) or next(
        (r for r in (spool.statuses() if spool.status_dir.exists() else [])
         if r["job_id"] == job_id), None)
    if st is not None:
        click.echo(dumps_pretty(st).decode(), nl=False)
        return False
    res = spool.read_result(job_id)
    if res is not None:
        click.echo(dumps_pretty(_ended_view(res)).decode(), nl=False)
        return True
    if (spool.inbox / f"{job_id}.json").exists():
        click.echo(f"{job_id}: pending (in the inbox, not yet claimed)")
        return False
    raise click.ClickException(_rejected(spool, job_id) or
                               f"no job {job_id!r} in {spool.inbox} or {spool.results}")


def _rejected(spool: Spool, job_id: str) -> str | None:
    """Why the file `<job_id>.json` (what `submit` writes) was rejected unread, if it was."""
    record = spool.rejection(f"{job_id}.json.error.json")
    if record is None:
        return None
    return (f"job {job_id!r}: its file {job_id}.json was rejected unrun: "
            f"{record.get('message')} (see {spool.rejected / (job_id + '.json.error.json')})")


def _ended_view(res: dict[str, Any]) -> dict[str, Any]:
    """What `status` shows of an ended job, from its result: `state` as for a live one."""
    return {"job_id": res.get("job_id"), "state": res.get("status"),
            **{k: res.get(k) for k in ("status", "error", "progress", "execution_summary")}}


def _status_redis(queue: Any, job_id: str | None) -> bool:
    """Print the queue's jobs (or one job); True when everything shown has ended."""
    if job_id is None:
        rows = _redis_call(queue, queue.rows)
        _table(rows)
        return all(_ended(r.get("state")) for r in rows)
    st = _redis_call(queue, lambda: queue.status(job_id))
    ended = False
    if st is None:
        res = _redis_call(queue, lambda: queue.result(job_id))
        if res is None:
            raise click.ClickException(f"no job {job_id!r} in redis at {queue.settings.redis_url}")
        st = _ended_view(res)
        ended = True
    click.echo(dumps_pretty(st).decode(), nl=False)
    return ended or _ended(st.get("state"))


@main.command()
@_spool_options
@_redis_option
@click.argument("job_id", callback=_job_id)
def result(config_file: Path | None, job_id: str, redis_url: str | None, **dirs: Any) -> None:
    """Print the result document of JOB_ID."""
    _, queue = _queue(config_file, redis_url, **dirs)
    if queue is not None:
        res = _redis_call(queue, lambda: queue.result(job_id))
        if res is None:
            raise click.ClickException(f"job {job_id!r} has no result yet in redis at "
                                       f"{queue.settings.redis_url}")
        click.echo(dumps_pretty(res).decode(), nl=False)
        return
    spool = _client_spool(config_file, **dirs)
    try:
        click.echo(spool.result_path(job_id).read_bytes().decode(), nl=False)
    except FileNotFoundError:
        known = spool.inbox.is_dir() and _claimed_job(spool, job_id) is not None
        raise click.ClickException((None if known else _rejected(spool, job_id)) or (
            f"job {job_id!r} has no result yet in {spool.results}" + (
                "" if known else f" (nor is it queued or running in {spool.inbox})"))) from None


@main.command(name="list")
@_spool_options
@click.option("--state", "-s", type=click.Choice(["pending", "queued", "assigned", "running",
                                                  *TERMINAL]), help="Only jobs in this state")
@_redis_option
def list_jobs(config_file: Path | None, state: str | None, redis_url: str | None,
              **dirs: Any) -> None:
    """List every job the spool (or the Redis queue) knows, optionally in one state."""
    _, queue = _queue(config_file, redis_url, **dirs)
    rows = _redis_call(queue, queue.rows) if queue is not None else \
        _rows(_watched_spool(config_file, **dirs))
    _table([r for r in rows if state is None or r.get("state") == state])


@main.command()
@_spool_options
@_redis_option
@click.argument("job_id", callback=_job_id)
@click.option("--wait", is_flag=True, help="Wait for the job's end and print its result "
              "(exit 0 only when it was cancelled)")
def cancel(config_file: Path | None, job_id: str, redis_url: str | None, wait: bool,
           **dirs: Any) -> None:
    """Ask the supervisor to cancel JOB_ID (queued or running, when cancellable)."""
    _, queue = _queue(config_file, redis_url, **dirs)
    if queue is not None:
        known = _redis_call(queue, lambda: queue.cancel(job_id))
        click.echo(f"cancel requested for {job_id}" + ("" if known else (
            " (no job with this id is known in redis yet: the request waits "
            f"{queue.settings.redis_status_ttl_seconds} s for one, added by a producer with XADD)")))
        if wait:
            sys.exit(_cancel_outcome(job_id, _redis_call(queue, lambda: _redis_result(queue, job_id))))
        return
    spool = _client_spool(config_file, **dirs)
    if not spool.inbox.is_dir():
        raise click.ClickException(f"no spool at {spool.inbox} (see --jobs-dir)")
    if spool.has_result(job_id):
        raise click.ClickException(f"job {job_id!r} has already finished")
    known = _claimed_job(spool, job_id)
    if known is not None and known.get("cancellable") is False:
        raise click.ClickException(
            f"job {job_id!r} cannot be cancelled: its execution.cancellable is false")
    spool.cancel_dir.mkdir(exist_ok=True)
    watch = _outcomes(spool, "cancel") if wait else None  # before the request: it may end at once
    spool.request_cancel(job_id)
    click.echo(f"cancel requested for {job_id}" + (
        "" if known is not None else " (no such job is queued or running here yet: the "
        "request waits for it)"))
    _unserved(spool)
    if watch is not None:
        sys.exit(_follow_cancel(spool, job_id, watch))


def _redis_result(queue: Any, job_id: str) -> dict[str, Any]:
    """The result of `job_id` from Redis, once it has one."""
    for _ in queue.follow(job_id):
        pass
    return queue.result(job_id) or {}


def _claimed_job(spool: Spool, job_id: str) -> dict[str, Any] | None:
    """The `execution` of job `job_id` as the supervisor holds it ({} when it has none or
    its file cannot be read), or None when no file it holds is that job's."""
    status = spool.read_status(job_id) or {}
    file = status.get("file") if status.get("job_id") == job_id else None
    held = spool.claimed()
    named = f"{job_id}.json"  # how submit, and most submitters, name a job's file
    held.sort(key=lambda item: original_name(item[1]) != named)  # those first: read few
    for where, claimed in held:
        if file is not None and claimed != file:
            continue  # its live status names its file: no need to read the others
        try:
            doc = loads(spool.read(where, claimed))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("job_id") == job_id:
            execution = doc.get("execution")
            return execution if isinstance(execution, dict) else {}
    return {} if file is not None else None


def _follow_cancel(spool: Spool, job_id: str, watch: Watch) -> int:
    """Wait until `job_id` has a result (print it; 0 when cancelled) or its cancel request
    is dropped without one (refused: 1). Closes `watch`."""
    try:
        while not spool.has_result(job_id):
            if not spool.cancel_requested(job_id) and not spool.has_result(job_id):
                click.echo(f"{job_id}: cancel refused (see the worker's log)", err=True)
                return 1
            select.select([watch.fileno()], [], [], 1.0)
            watch.read()
    finally:
        watch.close()
    return _cancel_outcome(job_id, spool.read_result(job_id) or {})


def _cancel_outcome(job_id: str, result: dict[str, Any]) -> int:
    """Print the result of a job asked to cancel; 0 when it was cancelled."""
    click.echo(f"{job_id}: {result.get('status', 'unknown')}", err=True)
    click.echo(dumps_pretty(result).decode(), nl=False)
    return 0 if result.get("status") == "cancelled" else 1


@main.command()
@_spool_options
@_offer_options
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def validate(config_file: Path | None, files: tuple[Path, ...], **flags: Any) -> None:
    """Check job FILES offline as the supervisor would take them: file, protocol, handler,
    results already written; say why a valid job would wait. Give supervise's settings."""
    for many in ("image_roots", "features"):
        flags[many] = list(flags[many]) or None
    settings, _ = _settings(config_file, **flags)
    registry = Registry.load(settings.model_dump(mode="json"))
    spool = Spool(settings)
    intake = Intake(spool, registry, settings, __version__, lambda _: False)
    bad = 0
    for path in files:
        verdict = _verdict(path, intake, spool, settings)
        bad += not verdict.startswith("OK")
        click.echo(f"{path}: {verdict}")
    sys.exit(1 if bad else 0)


def _verdict(path: Path, intake: Intake, spool: Spool, settings: config.Settings) -> str:
    """What the supervisor would make of job file `path`: "OK (...)" or "INVALID CODE: why"."""
    try:
        fd, st = fsutil.open_regular(path)
        try:
            doc, _ = parse_job(fsutil.read_capped(fd, st.st_size, settings.max_job_bytes),
                               str(path))
        finally:
            os.close(fd)
    except UnsafeFile as e:
        return f"INVALID VALIDATION_ERROR: job file {path}: {e}"
    except OSError as e:
        return f"INVALID VALIDATION_ERROR: job file {path}: cannot be read: {e.strerror}"
    except JobRejected as e:
        return f"INVALID {e.code}: {e.message}"
    if spool.has_result(doc.job_id):
        return (f"INVALID VALIDATION_ERROR: job {doc.job_id!r}: field 'job_id': duplicate; "
                f"a job with this id has finished (its result is {spool.result_path(doc.job_id)})")
    verdict = intake.judge(doc)
    if verdict.problem is not None:
        return f"INVALID {verdict.problem[0]}: {verdict.problem[1]}"
    return f"OK ({doc.job_id}, {doc.operation})" + (
        f"; it would wait: {verdict.wait}" if verdict.wait else "") + (
        "" if verdict.judged_here else
        " (its operation and payload are checked by a worker it is meant for)")


@main.command()
@_spool_options
def capabilities(config_file: Path | None, **dirs: Any) -> None:
    """Print the operations, payload types and features of this worker as JSON."""
    settings, _ = _settings(config_file, **dirs)
    registry = Registry.load(settings.model_dump(mode="json"))
    doc = {
        "worker_id": settings.worker_id, "pool": settings.pool, "version": __version__,
        "operations": registry.describe(),
        "capabilities": sorted(registry.capabilities()),
        "features": sorted(registry.features() | set(settings.features)),
        "max_concurrent_jobs": settings.max_concurrent,
        "limits": {"memory_mb": settings.memory_limit_mb,
                   "cpu_seconds": settings.cpu_limit_seconds,
                   "max_processes": settings.max_processes,
                   "max_open_files": settings.max_open_files,
                   "max_file_size_mb": settings.max_file_size_mb},
        "isolation": isolation.probe(settings, dry=True).layers(),
    }
    click.echo(dumps_pretty(doc).decode(), nl=False)


@main.command()
@_spool_options
@click.option("--metrics-addr", help="host:port of the worker (default: from its config)")
def health(config_file: Path | None, metrics_addr: str | None, **dirs: Any) -> None:
    """Ask the worker at metrics_addr whether it is healthy and ready; exit 0 only when both.
    With --jobs-dir, a supervisor must also serve that spool."""
    from worker import metrics

    settings, _ = _settings(config_file, metrics_addr=metrics_addr, **dirs)
    if dirs.get("jobs_dir") is not None and Spool(settings).server() is None:
        raise click.ClickException(f"no supervisor serves {settings.jobs_dir.absolute()}")
    if not settings.metrics_addr:
        raise click.ClickException("metrics_addr is empty: the worker serves no health endpoint")
    try:
        host, port = metrics.parse_address(settings.metrics_addr)
        answers = {path: metrics.fetch(host, port, path) for path in ("/healthz", "/readyz")}
    except (OSError, ConfigError) as e:
        raise click.ClickException(f"no worker answers at {settings.metrics_addr}: {e}") from None
    ok = True
    for path, (code, body) in answers.items():
        click.echo(f"{path.strip('/')}: {code} {body.decode(errors='replace').strip()}")
        ok = ok and code == 200
    sys.exit(0 if ok else 1)


@main.group(name="config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command(name="show")
@_spool_options
def config_show(config_file: Path | None, **dirs: Any) -> None:
    """Print the effective settings and where each value came from."""
    settings, sources = _settings(config_file, **dirs)
    for key, value in settings.model_dump(mode="json").items():
        click.echo(f"{key} = {dumps(value).decode()}    # {sources[key]}")


@main.command()
@_spool_options
@click.argument("job_id", callback=_job_id)
@click.option("--stream", type=click.Choice(["stdout", "stderr", "both"]), default="both")
def logs(config_file: Path | None, job_id: str, stream: str, **dirs: Any) -> None:
    """Print what JOB_ID wrote to its stdout and stderr."""
    settings, _ = _settings(config_file, **dirs)
    wd = settings.work_dir / job_id
    result = None if wd.is_dir() else Spool(settings).read_result(job_id)
    if not wd.is_dir() and result is None:
        raise click.ClickException(f"no work dir for job {job_id!r} in {settings.work_dir}")
    if result is not None and not (result.get("execution_summary") or {}).get("started_at"):
        raise click.ClickException(f"job {job_id!r} never ran (it ended {result.get('status')} "
                                   f"before it started): it has no output")
    # A job that ended with both logs empty and no files gives its work dir to a later job.
    for name in (["stdout", "stderr"] if stream == "both" else [stream]):
        path = wd / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        if stream == "both":
            click.echo(f"--- {name} ---")
        click.echo(text, nl=False)


