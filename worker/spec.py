"""The job document (PROTOCOL §1) as pydantic models, its validation messages, and orjson helpers."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from worker.errors import ErrorCode, JobRejected

PROTOCOL_VERSION = "1.0"
#: How deep arrays and objects may nest in a job document: what serde_json reads by
#: default, so the original worker too. Deeper data could not cross to the job's child
#: (pickle) nor come back in its result (orjson writes at most 254 levels).
MAX_NESTING = 127
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
OPERATION_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*(\.[a-z0-9][a-z0-9_-]*)+$")
VERSION_RE = re.compile(r"^\d+(\.\d+){0,2}([-+].*)?$")
PAYLOAD_TYPE_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+\.v[0-9]+$")

StrictInt = Annotated[int, Field(strict=True)]


def _timestamp_text(value: Any) -> Any:
    """Only text is a timestamp: a number would be read as seconds or milliseconds by size."""
    if not isinstance(value, str):
        raise ValueError("expected an RFC 3339 timestamp such as '2026-01-01T00:00:00Z'")
    return value


#: An RFC 3339 timestamp with its offset, written as a string.
Timestamp = Annotated[AwareDatetime, BeforeValidator(_timestamp_text)]
JobId = Annotated[str, Field(pattern=JOB_ID_RE.pattern)]
Operation = Annotated[str, Field(pattern=OPERATION_RE.pattern)]


class _Open(BaseModel):
    """Unknown fields are accepted and kept (forward compatibility)."""

    model_config = ConfigDict(extra="allow")


class Limits(_Open):
    """Per-job resource limits a job may ask for; the worker caps each at its own maximum."""

    memory_mb: Annotated[int, Field(strict=True, ge=16)] | None = None
    cpu_seconds: Annotated[int, Field(strict=True, ge=1)] | None = None
    max_processes: Annotated[int, Field(strict=True, ge=1)] | None = None
    max_open_files: Annotated[int, Field(strict=True, ge=16)] | None = None
    max_file_size_mb: Annotated[int, Field(strict=True, ge=1)] | None = None


class Execution(_Open):
    """How, when and how often the job runs."""

    idempotency_key: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    attempt: Annotated[int, Field(strict=True, ge=1)] = 1
    max_attempts: Annotated[int, Field(strict=True, ge=1, le=100)] = 1
    timeout_seconds: Annotated[int, Field(strict=True, ge=1, le=86400)] = 3600
    deadline: Timestamp | None = None
    priority: Annotated[int, Field(strict=True, ge=1, le=10)] = 5
    cancellable: Annotated[bool, Field(strict=True)] = True
    limits: Limits | None = None

    @model_validator(mode="after")
    def _attempt_within_max(self) -> Execution:
        if self.attempt > self.max_attempts:
            raise ValueError(
                f"attempt ({self.attempt}) must not exceed max_attempts ({self.max_attempts})"
            )
        return self


class Constraints(_Open):
    """What a worker must offer to take the job."""

    required_capabilities: list[str] = Field(default_factory=list)
    required_features: list[str] = Field(default_factory=list)
    minimum_worker_version: Annotated[str, Field(pattern=VERSION_RE.pattern)] | None = None
    maximum_disk_size_gb: Annotated[int, Field(strict=True, ge=0)] | None = None
    require_privileged: Annotated[bool, Field(strict=True)] = False
    allowed_worker_pools: list[str] = Field(default_factory=list)


class Routing(_Open):
    """Which worker or pool should take the job."""

    worker_id: str | None = None
    worker_pool: str | None = None
    affinity: dict[str, str] = Field(default_factory=dict)
    anti_affinity: dict[str, list[str]] = Field(default_factory=dict)


class Metadata(_Open):
    """Descriptive labels; never used for decisions."""

    name: str | None = None
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Observability(_Open):
    """Trace identifiers copied into the result and the logs."""

    trace_id: str | None = None
    span_id: str | None = None
    parent_span_id: str | None = None
    correlation_id: str | None = None


class Payload(_Open):
    """The operation's input: a versioned type and its data."""

    type: Annotated[str, Field(pattern=PAYLOAD_TYPE_RE.pattern)]
    data: Any


class JobDocument(_Open):
    """One job as submitted (PROTOCOL §1)."""

    schema_: str | None = Field(default=None, alias="$schema")
    version: Literal["1.0"]
    job_id: JobId
    created_at: Timestamp | None = None
    kind: Literal["VMOperation"]
    operation: Operation
    payload: Payload
    metadata: Metadata | None = None
    execution: Execution = Field(default_factory=Execution)
    constraints: Constraints = Field(default_factory=Constraints)
    routing: Routing = Field(default_factory=Routing)
    observability: Observability | None = None
    audit: dict[str, Any] | None = None


UTF8_BOM = b"\xef\xbb\xbf"  #: what some editors put before UTF-8 text; skipped when read


def loads(data: bytes) -> Any:
    """Decode JSON bytes (UTF-8 only, a leading byte order mark allowed)."""
    return orjson.loads(data[3:] if data[:3] == UTF8_BOM else data)


def dumps(obj: Any) -> bytes:
    """Encode to compact JSON bytes; datetimes as RFC 3339."""
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)


def dumps_pretty(obj: Any) -> bytes:
    """Encode to indented JSON bytes with a trailing newline (result and status files)."""
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n"


def now_utc() -> datetime:
    """The current time, timezone-aware."""
    return datetime.now(UTC)


def rfc3339(ts: datetime | None = None) -> str:
    """Format a time (default now) as RFC 3339 UTC with milliseconds."""
    return (ts or now_utc()).astimezone(UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def safe_job_id(raw: Any) -> str | None:
    """Return `raw["job_id"]` when it is usable in file names, else None (`fullmatch`: the
    pattern's `$` alone would let a final newline through)."""
    if isinstance(raw, dict):
        jid = raw.get("job_id")
        if isinstance(jid, str) and JOB_ID_RE.fullmatch(jid):
            return jid
    return None


def too_deep(raw_bytes: bytes, doc: Any) -> tuple[str, int] | None:
    """Where (a dotted field, at most 3 parts) and how deep `doc` nests arrays and objects
    when more than MAX_NESTING levels, at its deepest; None when within. `raw_bytes` (its
    JSON) rules most documents out without a walk."""
    if raw_bytes.count(b"[") + raw_bytes.count(b"{") <= MAX_NESTING:
        return None
    deepest: tuple[str, int] | None = None
    stack: list[tuple[Any, int, tuple[str, ...]]] = [(doc, 1, ())]  # (container, level, head)
    while stack:
        value, level, head = stack.pop()
        if level > MAX_NESTING and (deepest is None or level > deepest[1]):
            deepest = ".".join(head), level
        items = value.items() if isinstance(value, dict) else enumerate(value)
        stack.extend((v, level + 1, head if len(head) == 3 else (*head, str(k)))
                     for k, v in items if isinstance(v, dict | list))
    return deepest


#: The integers orjson reads exactly (and writes back); a wider one it reads as a float.
INT_RANGE = (-(2**63), 2**64 - 1)
_KEY_END = re.compile(rb'"\s*:')
_SPACE_AFTER_QUOTE = (b'" ', b'"\n', b'"\t', b'"\r')


class _Wide(str):
    """An integer literal beyond INT_RANGE, as written."""


class _Members(list[tuple[str, Any]]):
    """A JSON object's members in order, a repeated key kept."""


def _exact_int(text: str) -> int | _Wide:
    if len(text) < 19:
        return int(text)
    if len(text) <= 21 and INT_RANGE[0] <= (value := int(text)) <= INT_RANGE[1]:
        return value
    return _Wide(text)


def _census(doc: Any) -> tuple[int, bool]:
    """How many keys the objects in `doc` hold, all levels, and whether it holds a float
    as large as 2**63 (what orjson makes of a wider integer)."""
    keys, large = 0, False
    stack: list[Any] = [[doc]]  # the document itself may be a lone number
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            keys += len(value)
            value = value.values()
        for item in value:
            if isinstance(item, dict | list):
                stack.append(item)
            elif type(item) is float and abs(item) >= 9.2e18:
                large = True
    return keys, large


def _key_ends(raw_bytes: bytes) -> int:
    """How many `"` then `:` pairs (whitespace between) `raw_bytes` has: one per key, and
    any more a string holds."""
    if any(gap in raw_bytes for gap in _SPACE_AFTER_QUOTE):
        return len(_KEY_END.findall(raw_bytes))
    return raw_bytes.count(b'":')


def ambiguous(raw_bytes: bytes, doc: Any) -> tuple[str, str] | None:
    """(dotted field, what is wrong) where the JSON `raw_bytes` says more than `doc`, what
    orjson read from it, keeps: an integer beyond INT_RANGE (read as an inexact float) or a
    key repeated within one object (the last kept; another reader may keep the first).
    Only a document with a large float, or with more key ends than keys, is read again."""
    keys, large = _census(doc)
    return _first_ambiguity(raw_bytes) if large or _key_ends(raw_bytes) != keys else None


def describe_ambiguity(field: str, what: str) -> str:
    """`what`, after "field 'a.b': " (a long field cut) unless it is the document itself."""
    shown = field if len(field) <= 60 else f"{field[:57]}..."
    return f"field {shown!r}: {what}" if field else what


def _first_ambiguity(raw_bytes: bytes) -> tuple[str, str] | None:
    """`ambiguous`'s answer, from `raw_bytes` read again keeping every key and integer."""
    tree = json.loads(raw_bytes, parse_int=_exact_int, object_pairs_hook=_Members)
    stack: list[tuple[Any, tuple[str, ...]]] = [(tree, ())]
    while stack:
        value, where = stack.pop()
        if isinstance(value, _Wide):
            got = value if len(value) <= 40 else f"{value[:20]}...({len(value)} characters)"
            return ".".join(where), (f"expected an integer from -2**63 to 2**64-1 (send a "
                                     f"wider one as a string), got {got}")
        if isinstance(value, _Members):
            seen: set[str] = set()
            for key, _ in value:
                if key in seen:
                    return ".".join((*where, key)), ("expected each key once in its object, "
                                                     "got it twice (which one counts is not "
                                                     "defined)")
                seen.add(key)
            stack.extend((member, (*where, key)) for key, member in reversed(value))
        elif isinstance(value, list):
            stack.extend((member, (*where, str(i))) for i, member in reversed(list(enumerate(value))))
    return None


def _wide_bom(raw_bytes: bytes) -> str | None:
    """The encoding a UTF-16 or UTF-32 byte order mark at the start names, or None."""
    for mark, name in ((b"\xff\xfe\0\0", "UTF-32"), (b"\0\0\xfe\xff", "UTF-32"),
                       (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if raw_bytes.startswith(mark):
            return name
    return None


def _not_utf8(raw_bytes: bytes) -> str | None:
    """Where `raw_bytes` stops being UTF-8, or None when it is UTF-8 throughout."""
    try:
        raw_bytes.decode()
    except UnicodeDecodeError as e:
        return (f"byte 0x{raw_bytes[e.start]:02x} at offset {e.start} is not part of a UTF-8 "
                "character (a file saved as Latin-1 or Windows-1252?)")
    return None


def _source(label: str) -> str:
    """What a reason calls the document's holder: a queue's message, or a job file."""
    return label if label.startswith("message ") else f"job file {label}"


def parse_job(raw_bytes: bytes, label: str) -> tuple[JobDocument, dict[str, Any]]:
    """Decode and validate a job document; raise JobRejected naming the job and the field."""
    raw_bytes = raw_bytes.removeprefix(UTF8_BOM)
    try:
        raw = loads(raw_bytes)
    except orjson.JSONDecodeError as e:
        if (bom := _wide_bom(raw_bytes)) is not None:
            raise JobRejected(ErrorCode.VALIDATION_ERROR, f"{_source(label)}: not valid UTF-8: "
                              f"it is {bom} (it starts with that byte order mark)") from None
        what = "UTF-8" if "utf-8" in str(e).lower() else "JSON"
        why = (_not_utf8(raw_bytes) if what == "UTF-8" else None) or e
        raise JobRejected(
            ErrorCode.VALIDATION_ERROR, f"{_source(label)}: not valid {what}: {why}"
        ) from None
    if not isinstance(raw, dict):
        raise JobRejected(
            ErrorCode.VALIDATION_ERROR,
            f"{_source(label)}: expected a JSON object, got {type(raw).__name__}",
        )
    jid = safe_job_id(raw)
    who = f"job {jid!r}" if jid else _source(label)
    if (deep := too_deep(raw_bytes, raw)) is not None:
        raise JobRejected(ErrorCode.VALIDATION_ERROR,
                          f"{who}: field {deep[0]!r}: expected arrays and objects nested at most "
                          f"{MAX_NESTING} levels deep (the document counts as 1), got {deep[1]}",
                          jid)
    if (odd := ambiguous(raw_bytes, raw)) is not None:
        if odd[0] == "job_id":  # neither id may be the job's: no result goes under either
            who, jid = _source(label), None
        raise JobRejected(ErrorCode.VALIDATION_ERROR, f"{who}: {describe_ambiguity(*odd)}", jid)
    if "version" in raw and raw["version"] != PROTOCOL_VERSION:
        raise JobRejected(
            ErrorCode.UNSUPPORTED_VERSION,
            f"{who}: field 'version': expected {PROTOCOL_VERSION!r}, got {raw['version']!r}",
            jid, _observability(raw),
        )
    try:
        return JobDocument.model_validate(raw), raw
    except ValidationError as e:
        raise JobRejected(ErrorCode.VALIDATION_ERROR, f"{who}: {describe(e)}", jid,
                          _observability(raw)) from None


def _observability(raw: dict[str, Any]) -> dict[str, Any] | None:
    """A rejected document's `observability` when it is valid by itself (its result keeps
    it, as an accepted job's does), else None."""
    block = raw.get("observability")
    if block is None:
        return None
    try:
        return Observability.model_validate(block).model_dump()
    except ValidationError:
        return None


def describe(err: ValidationError, prefix: str = "") -> str:
    """Turn a pydantic error into '; '-joined "field 'a.b': expected ..., got ..." phrases."""
    parts = []
    for item in err.errors(include_url=False)[:8]:
        loc = ".".join(str(p) for p in (prefix, *item["loc"]) if p != "")
        value = item.get("input")
        got = repr(value)
        if len(got) > 60:
            got = got[:57] + "..." + (f" ({len(value)} characters)" if isinstance(value, str) else "")
        msg = item["msg"]
        if item["type"] == "string_pattern_mismatch":
            pattern = str((item.get("ctx") or {}).get("pattern", ""))
            msg = "Input should be " + _PATTERN_TEXT.get(pattern, f"a string matching {pattern!r}")
        if item["type"] == "missing":
            parts.append(f"field '{loc}': required but missing")
        else:
            parts.append(f"field '{loc}': {_expected(msg)}, got {got}")
    return "; ".join(parts)


#: What a valid job id is, in words.
JOB_ID_TEXT = "1-128 characters of A-Z a-z 0-9 . _ -, the first a letter or digit"
_PATTERN_TEXT = {
    JOB_ID_RE.pattern: JOB_ID_TEXT,
    OPERATION_RE.pattern: "a lower-case dotted name such as 'system.echo'",
    PAYLOAD_TYPE_RE.pattern: "'<namespace>.<name>.v<N>', e.g. 'system.echo.v1'",
    VERSION_RE.pattern: "a version such as '0.5' or '1.2.3'",
}


def _expected(msg: str) -> str:
    msg = msg.removeprefix("Value error, ")
    if msg.startswith("Input should be "):
        return "expected " + msg.removeprefix("Input should be ")
    if msg.startswith("String should match pattern"):
        return "expected " + msg.replace("String should match pattern", "a string matching")
    return msg[0].lower() + msg[1:] if msg else "invalid"
