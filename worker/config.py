"""Settings: defaults < TOML file < environment (GUESTKIT_WORKER_*) < command-line flags."""

from __future__ import annotations

import difflib
import os
import socket
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from worker import metrics
from worker.errors import ConfigError
from worker.spec import describe

DEFAULT_CONFIG = Path("/etc/guestkit-worker/worker.toml")
ENV_PREFIX = "GUESTKIT_WORKER_"
#: Schemes a Redis URL may have (redis-py's from_url).
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
#: Optional isolation layers (DESIGN §5), all on by default where the host offers them.
ISOLATION_LAYERS = ("cgroup", "pid-namespace", "network-namespace", "landlock", "seccomp", "user")


class Settings(BaseModel):
    """Every setting of the worker; the description is the documentation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    worker_id: str = Field(
        default_factory=socket.gethostname, min_length=1, description="This worker's name"
    )
    pool: str = Field("default", min_length=1, description="The worker pool it serves")
    jobs_dir: Path = Field(Path("./jobs"), description="The spool: inbox and state directories")
    results_dir: Path = Field(Path("./results"), description="Where result documents go")
    work_dir: Path = Field(Path("./work"), description="Per-job scratch dirs and captured output")
    output_dir: Path = Field(Path("./outputs"), description="Where handlers may write outputs")
    image_roots: list[Path] = Field(
        default_factory=list, description="Directories disk images may be read from"
    )
    max_concurrent: int = Field(4, ge=1, le=1024, description="Jobs running at once")
    shutdown_timeout: float = Field(
        30.0, ge=0, description="Seconds a drain waits for running jobs before killing them"
    )
    kill_grace: float = Field(5.0, ge=0, description="Seconds between SIGTERM and SIGKILL")
    max_job_bytes: int = Field(1 << 20, ge=1024, description="Largest job file accepted")
    max_message_bytes: int = Field(
        16 << 20, ge=4096, description="Largest message (and result) a child may send"
    )
    memory_limit_mb: int = Field(2048, ge=16, description="Default and cap of a job's memory")
    cpu_limit_seconds: int | None = Field(
        None, ge=1, description="Default and cap of a job's CPU seconds (none: its timeout)"
    )
    max_processes: int = Field(64, ge=1, description="Default and cap of a job's processes")
    max_open_files: int = Field(256, ge=16, description="Default and cap of a job's open files")
    max_file_size_mb: int = Field(4096, ge=1, description="Largest file a job may write")
    retry_backoff: float = Field(1.0, ge=0, description="Seconds before the first retry")
    retry_backoff_max: float = Field(300.0, ge=0, description="Longest wait between retries")
    stall_timeout: float = Field(300.0, gt=0, description="Seconds of silence before 'stalled'")
    features: list[str] = Field(default_factory=list, description="Features this host offers")
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels that routing.affinity and anti_affinity match (host, worker_id "
        "and pool are always there)",
    )
    privileged: bool = Field(
        default_factory=lambda: os.geteuid() == 0, description="Whether jobs may need root"
    )
    user: str = Field(
        "auto", description="Job user when run as root: auto (guestkit, else nobody), a name, or root"
    )
    group: str = Field("", description="Job group (default: the job user's primary group)")
    isolation: list[str] = Field(
        default_factory=lambda: list(ISOLATION_LAYERS),
        description="Optional isolation layers to apply where the host offers them",
    )
    operation_limits: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="Per-operation caps, e.g. {'guestkit.inspect': {'memory_mb': 4096}}",
    )
    fsync: bool = Field(True, description="fsync results and state changes (durability)")
    spares: bool = Field(
        True, description="Keep a boxed child waiting per free slot so that jobs start at once"
    )
    queue_window: int = Field(
        500, ge=1,
        description="Ready jobs held in memory; more wait in a compact backlog, read back from "
                    "their claimed files when they reach the front",
    )
    log_format: str = Field(
        "auto", pattern="^(auto|human|json|journal)$", description="auto|human|json|journal"
    )
    log_level: str = Field(
        "info", pattern="^(debug|info|warning|error)$", description="debug|info|warning|error"
    )
    metrics_addr: str = Field(
        "127.0.0.1:9464", description="host:port for /metrics, /healthz, /readyz; empty: off"
    )
    transport: str = Field(
        "spool", pattern="^(spool|redis)$",
        description="Where jobs come from: spool (the jobs directory only) or redis (a shared stream too)",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", min_length=1, description="The Redis server of the redis transport"
    )
    redis_stream_prefix: str = Field(
        "guestkit", pattern=r"^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)*$",
        description="Prefix of every Redis key: <prefix>:jobs:<pool> is the pool's stream",
    )
    redis_group: str = Field(
        "guestkit-workers", pattern=r"^[A-Za-z0-9_.:-]+$",
        description="The consumer group all workers of a pool share",
    )
    redis_renew_seconds: float = Field(
        5.0, gt=0, le=3600, description="How often the leases of held messages are renewed"
    )
    redis_claim_idle_seconds: float = Field(
        30.0, gt=0, le=86400,
        description="Idle time after which another worker takes over a message (> 2 x renew)",
    )
    redis_max_deliveries: int = Field(
        5, ge=1, le=1000,
        description="Executions of one message across all workers before it goes to the dead-letter stream",
    )
    redis_result_ttl_seconds: int = Field(
        7 * 86400, ge=60, description="How long results and idempotency keys stay in Redis"
    )
    redis_status_ttl_seconds: int = Field(
        86400, ge=60, description="How long a job's live status and cancel request stay in Redis"
    )

    @field_validator("isolation")
    @classmethod
    def _known_layers(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in ISOLATION_LAYERS]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}; known: {list(ISOLATION_LAYERS)}")
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            try:
                metrics.parse_address(value)
            except ConfigError:
                raise ValueError("expected host:port (e.g. 127.0.0.1:9464, port at most "
                                 "65535), or '' for no endpoint") from None
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(REDIS_SCHEMES):
            raise ValueError(f"expected a URL starting with one of {list(REDIS_SCHEMES)}")
        return value

    @field_validator("redis_claim_idle_seconds")
    @classmethod
    def _lease_outlives_renewal(cls, value: float, info: ValidationInfo) -> float:
        renew = info.data.get("redis_renew_seconds")
        if renew is not None and value < 2 * renew:
            raise ValueError(f"expected at least twice redis_renew_seconds ({renew:g}), or live "
                             "workers would lose their jobs to others")
        return value

    @field_validator("labels")
    @classmethod
    def _own_labels(cls, value: dict[str, str]) -> dict[str, str]:
        taken = sorted(set(value) & {"host", "worker_id", "pool"})
        if taken:
            raise ValueError(f"labels {taken} are the worker's own (its host name, worker_id "
                             "and pool); choose other names")
        if "" in value:
            raise ValueError("a label needs a name (KEY=VALUE)")
        return value

    @field_validator("operation_limits")
    @classmethod
    def _known_limits(cls, value: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        known = {"memory_mb", "cpu_seconds", "max_processes", "max_open_files", "max_file_size_mb"}
        for op, limits in value.items():
            unknown = sorted(set(limits) - known)
            if unknown:
                raise ValueError(f"operation_limits.{op}: unknown limit(s) {unknown}")
            if any(not isinstance(v, int) or v < 1 for v in limits.values()):
                raise ValueError(f"operation_limits.{op}: limits must be positive integers")
        return value


#: Settings read once, at start: the spool's paths, the worker's identity, what its jobs'
#: sandbox is made of, what it listens on and the shared queue's connection. A reload
#: (SIGHUP) keeps their running values and says which ones it could not apply.
RESTART_ONLY = (
    "worker_id", "pool", "jobs_dir", "results_dir", "work_dir", "output_dir", "image_roots",
    "user", "group", "isolation", "metrics_addr", "transport",
    *(name for name in Settings.model_fields if name.startswith("redis_")),
)


def key_values(items: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` items as a dict; ValueError naming the first without a key or an `=`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    names = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {ENV_PREFIX + "CONFIG"}
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in names)
    if unknown:  # a misspelt variable would otherwise be ignored without a word
        hints = [f"{k}{_did_you_mean(k, names)}" for k in unknown]
        raise ConfigError(f"environment: no such setting: {', '.join(hints)}")
    out: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if field.annotation is not None and "list" in str(field.annotation):
            out[name] = [p for p in raw.split(",") if p]
        elif field.annotation == dict[str, str]:  # KEY=VALUE,KEY=VALUE
            try:
                out[name] = key_values(p for p in raw.split(",") if p)
            except ValueError as e:
                raise ConfigError(f"environment: {ENV_PREFIX}{name.upper()}: {e}") from None
        else:
            out[name] = raw
    return out


def _did_you_mean(name: str, known: set[str]) -> str:
    """' (did you mean X?)' for the known variable closest to `name` after the prefix, or ''."""
    n = len(ENV_PREFIX)
    suffixes = sorted(k[n:] for k in known)
    close = [s for s in suffixes if s.endswith("_" + name[n:])] or \
        difflib.get_close_matches(name[n:], suffixes, n=1)
    return f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""


def _from_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML: {e}") from None
    section = data.get("worker", data)
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: [worker] must be a table")
    unknown = sorted(set(section) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)}")
    return dict(section)


def load(
    flags: dict[str, Any],
    config_file: Path | None = None,
    environ: dict[str, str] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """Build the effective settings and say where each value came from."""
    environ = dict(os.environ) if environ is None else environ
    layers: list[tuple[str, dict[str, Any]]] = []
    path = config_file or (Path(environ[ENV_PREFIX + "CONFIG"]) if ENV_PREFIX + "CONFIG" in environ else None)
    if path is not None:
        layers.append((f"file {path}", _from_file(path)))
    elif DEFAULT_CONFIG.exists():
        layers.append((f"file {DEFAULT_CONFIG}", _from_file(DEFAULT_CONFIG)))
    layers.append(("environment", _from_env(environ)))
    layers.append(("flag", {k: v for k, v in flags.items() if v is not None}))
    merged: dict[str, Any] = {}
    sources = {name: "default" for name in Settings.model_fields}
    for source, values in layers:
        for key, value in values.items():
            merged[key] = value
            sources[key] = source
    try:
        return Settings.model_validate(merged), sources
    except ValidationError as e:
        where = {_source(sources, str(err["loc"][0])) for err in e.errors()}
        raise ConfigError(f"invalid setting ({', '.join(sorted(where))}): {describe(e)}") from None


def _source(sources: dict[str, str], key: str) -> str:
    """Where setting `key` came from, naming its variable when it is the environment."""
    source = sources.get(key, "default")
    return f"environment {ENV_PREFIX}{key.upper()}" if source == "environment" else source
