"""The Redis Streams transport (DESIGN §8): one stream per pool, one consumer group, leases renewed
while a job is held, takeover of a dead worker's messages, a dead-letter stream for poison, and the
results, live status and idempotency keys every worker and client shares.

Names (all under `redis_stream_prefix`, `P`):

| name | what |
|---|---|
| `P:jobs:<pool>` | the pool's stream; each entry has a `job` field holding the job document (JSON) |
| `P:dead:<pool>` | dead letters: poison, malformed and rejected messages, with their history |
| `P:result:<id>` | the result document; written once with `SET NX` (the first writer wins) |
| `P:status:<id>` | the live status document (state, attempt, progress, worker) |
| `P:cancel:<id>` | a cancel request; `P:cancel` is the channel that tells the workers |
| `P:events:<id>` | channel: every status write of the job, for clients that follow it |
| `P:idem:<key>` | the job that holds an idempotency key |
| `P:owner:<id>` | the message that carries job `<id>` |
| `P:workers:<pool>` | the live workers (sorted set: when each one's profile expires, in ms) |
| `P:profiles:<pool>` | each live worker's profile: what jobs it can take (hash by worker id) |
| `P:declined:<id>` | the workers that handed job `<id>` on: it never goes back to them |
| `P:handed:<pool>:<worker>` | messages handed to that worker; `P:handoff:<pool>:<worker>` tells it |

A message is a *delivery* each time an execution of it starts anywhere: the first read, a takeover
and a local retry all count, so a job that crashes its child or its worker every time is moved to
the dead-letter stream after `redis_max_deliveries` executions. A message is acknowledged (and
deleted from the stream) only after its result is stored in Redis and in the local results dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import selectors
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.client import PubSub
from redis.retry import Retry

from worker.config import Settings
from worker.errors import ErrorCode
from worker.results import Ending, build
from worker.spec import dumps, loads, rfc3339, safe_job_id
from worker.spool import Spool
from worker.transports import Cancel, Deliver, Fits, Remote

log = logging.getLogger("guestkit.redis")

BLOCK_MS = 2000  #: how long one XREADGROUP waits on the server for new entries
REPLY_SLACK = 5.0  #: seconds past BLOCK_MS without a reply before the connection counts as dead
COMMAND_TIMEOUT = 2.0  #: socket timeout of every command (the loop never waits longer)
BACKOFF_FIRST, BACKOFF_MAX = 0.25, 2.0  #: reconnect back-off, doubling, with jitter
DEAD_MAXLEN = 100_000  #: the dead-letter stream keeps about this many entries
UNREACHABLE = "<redis unreachable>"  #: the key holder reported while Redis cannot be asked
ERRORS = (redis.RedisError, OSError)

#: Renew the leases of ARGV[3..] for consumer ARGV[2]; return those it no longer holds.
_RENEW = """
local lost, gone = {}, {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 0 then
    gone[#gone + 1] = ARGV[i]
  elseif p[1][2] ~= ARGV[2] then
    lost[#lost + 1] = ARGV[i]
  else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  end
end
return {lost, gone}
"""
#: Count one more delivery of ARGV[3] held by ARGV[2]; return the new count, or -1 when not held.
_COUNT = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return -1 end
local n = p[1][4] + 1
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'RETRYCOUNT', n, 'JUSTID')
return n
"""
#: Store the result once; only the writer that stored it updates the status and tells followers.
_PUBLISH = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[3])
return 1
"""
#: If consumer ARGV[3] holds message ARGV[2], take it off the stream KEYS[1] and add it to the
#: stream KEYS[2] (the same one, or another pool's) as a new entry (fields ARGV[7..]); move the
#: job id's owner KEYS[3] to the new entry when ARGV[2] held it; when ARGV[4] is a status,
#: make it the job's (KEYS[4], for ARGV[5] s) and publish it on ARGV[6]. False: not held.
_GIVE_BACK = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return false end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 7))
if redis.call('GET', KEYS[3]) == ARGV[2] then
  redis.call('SET', KEYS[3], id, 'KEEPTTL')
end
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[4], ARGV[4], 'EX', ARGV[5])
  redis.call('PUBLISH', ARGV[6], ARGV[4])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return id
"""
#: Show profile ARGV[2] of worker ARGV[1] until ARGV[3] ms from now (ARGV[2] empty: withdraw
#: it), forget the expired ones, and return the live workers' profiles.
_ADVERTISE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
if #live == 0 then return {} end
return redis.call('HMGET', KEYS[2], unpack(live))
"""
#: Worker ARGV[2] declines message ARGV[3]: KEYS[2], the job's decliners, gets ARGV[10] (the
#: worker and its profile's fingerprint, so that a worker set up anew counts as another). The
#: message goes to the first worker of ARGV[11..] ("<worker> <fingerprint>") that is still
#: live (KEYS[4]) and has not declined it: it becomes that worker's (noted in the set
#: ARGV[7]..worker, announced on ARGV[8]..worker), and the job's status KEYS[3] is ARGV[6]
#: with that worker_id (published on ARGV[9]). Return {that worker, or '' for none, then the
#: workers skipped as no longer live}; false when the message is not ARGV[2]'s any more.
_HAND_OFF = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return false end
redis.call('SADD', KEYS[2], ARGV[10])
redis.call('EXPIRE', KEYS[2], ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stopped = {''}
for i = 11, #ARGV do
  local w = string.match(ARGV[i], '^(.*) [^ ]*$')
  local until_ms = redis.call('ZSCORE', KEYS[4], w)
  if not until_ms or tonumber(until_ms) <= now then
    stopped[#stopped + 1] = w
  elseif w ~= ARGV[2] and redis.call('SISMEMBER', KEYS[2], ARGV[i]) == 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], w, 0, ARGV[3], 'JUSTID')
    local status = cjson.decode(ARGV[6])
    status['worker_id'] = w
    local doc = cjson.encode(status)
    redis.call('SET', KEYS[3], doc, 'EX', ARGV[5])
    redis.call('PUBLISH', ARGV[9], doc)
    redis.call('SADD', ARGV[7] .. w, ARGV[3])
    redis.call('EXPIRE', ARGV[7] .. w, ARGV[4])
    redis.call('PUBLISH', ARGV[8] .. w, ARGV[3])
    stopped[1] = w
    return stopped
  end
end
return stopped
"""
#: Make ARGV[1] the holder of the key unless another job holds it that has not failed.
_TAKE_KEY = """
local h = redis.call('GET', KEYS[1])
if h and h ~= ARGV[1] then
  local r = redis.call('GET', ARGV[3] .. h)
  if not r then return h end
  local ok, doc = pcall(cjson.decode, r)
  if not ok or type(doc) ~= 'table' or doc['status'] == 'completed' then return h end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
"""


#: A message's probe: (its job has a result, a cancel is requested, the job's shared
#: status, the id of the message that carries the job id, or None)
Probe = tuple[bool, bool, dict[str, Any] | None, str | None]
PROBE_OPS = 5  #: the commands `RedisRemote._probe_into` queues for one message


def fingerprint(profile: bytes) -> str:
    """A short digest of a worker's profile as it shows it: the same worker set up anew
    (other features, labels, version) gets another."""
    return hashlib.blake2b(profile, digest_size=6).hexdigest()


def _not_an_object(raw: bytes) -> str:
    """Why `raw` is no JSON object: orjson's error (bad UTF-8 or JSON, too deep), or its type."""
    try:
        value = loads(raw)
    except ValueError as e:
        return str(e)
    return f"it is {type(value).__name__}"


def _probe_reply(replies: list[Any]) -> Probe:
    """A Probe from the PROBE_OPS replies of `RedisRemote._probe_into`."""
    done, cancelled, status, _, owner = replies
    return bool(done), bool(cancelled), _json(status), _text(owner) if owner else None


@dataclass(frozen=True)
class Keys:
    """Every Redis name of one pool."""

    prefix: str
    pool: str

    @property
    def stream(self) -> str:
        """The pool's job stream."""
        return f"{self.prefix}:jobs:{self.pool}"

    @property
    def dead(self) -> str:
        """The pool's dead-letter stream."""
        return f"{self.prefix}:dead:{self.pool}"

    @property
    def cancel_channel(self) -> str:
        """The channel cancel requests are announced on."""
        return f"{self.prefix}:cancel"

    def result(self, job_id: str) -> str:
        """The result key of a job."""
        return f"{self.prefix}:result:{job_id}"

    def status(self, job_id: str) -> str:
        """The live status key of a job."""
        return f"{self.prefix}:status:{job_id}"

    def cancel(self, job_id: str) -> str:
        """The cancel request key of a job."""
        return f"{self.prefix}:cancel:{job_id}"

    def events(self, job_id: str) -> str:
        """The channel a job's status writes are published on."""
        return f"{self.prefix}:events:{job_id}"

    def idem(self, key: str) -> str:
        """The key naming the holder of an idempotency key."""
        return f"{self.prefix}:idem:{key}"

    def owner(self, job_id: str) -> str:
        """The key naming the message that carries job `job_id`: the first one seen with it."""
        return f"{self.prefix}:owner:{job_id}"

    @property
    def workers(self) -> str:
        """The pool's live workers: a sorted set, scored by when each one's profile expires."""
        return f"{self.prefix}:workers:{self.pool}"

    @property
    def profiles(self) -> str:
        """The profiles of the pool's workers, by worker id."""
        return f"{self.prefix}:profiles:{self.pool}"

    def declined(self, job_id: str) -> str:
        """The set of workers that handed job `job_id` on."""
        return f"{self.prefix}:declined:{job_id}"

    def handed(self, worker: str = "") -> str:
        """The set of messages handed to `worker` (without it: the names' common prefix)."""
        return f"{self.prefix}:handed:{self.pool}:{worker}"

    def handoff(self, worker: str = "") -> str:
        """The channel that tells `worker` of a message handed to it (without it: the prefix)."""
        return f"{self.prefix}:handoff:{self.pool}:{worker}"


def connect(url: str, timeout: float = COMMAND_TIMEOUT) -> redis.Redis:
    """A client that never retries on its own (the caller decides) and never waits past `timeout`."""
    return redis.Redis.from_url(url, protocol=2, socket_timeout=timeout,
                                socket_connect_timeout=min(timeout, 1.0),
                                retry=Retry(NoBackoff(), 0), health_check_interval=0)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _json(raw: Any) -> dict[str, Any] | None:
    """A JSON object from Redis bytes, or None."""
    if raw is None:
        return None
    try:
        doc = loads(raw if isinstance(raw, bytes) else str(raw).encode())
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _entries(reply: Any) -> Iterator[tuple[str, dict[bytes, bytes]]]:
    """(id, fields) of a raw XREADGROUP reply (None when it timed out)."""
    for _stream, entries in reply or []:
        for mid, flat in entries or []:
            flat = flat or []
            yield _text(mid), dict(zip(flat[::2], flat[1::2], strict=True))


def ran_before(status: dict[str, Any] | None) -> int | None:
    """The attempt a stopped worker had started, from the job's shared status (None: none ran)."""
    if not status:
        return None
    attempt = status.get("attempt")
    if not isinstance(attempt, int) or attempt < 1:
        return None
    if status.get("state") in ("assigned", "running"):
        return attempt
    return attempt - 1 if status.get("state") == "queued" and attempt > 1 else None


def _idempotency_key(doc: dict[str, Any]) -> str | None:
    ex = doc.get("execution")
    key = ex.get("idempotency_key") if isinstance(ex, dict) else None
    return key if isinstance(key, str) and key else None


def _final_status(job_id: str, result: dict[str, Any], worker_id: str) -> dict[str, Any]:
    """The status a job keeps once its result is stored."""
    summary = result.get("execution_summary") or {}
    return {"job_id": job_id, "state": result.get("status"), "worker_id": worker_id,
            "attempt": summary.get("attempt"), "max_attempts": summary.get("max_attempts"),
            "detail": (result.get("error") or {}).get("code", ""), "updated_at": rfc3339()}


@dataclass
class Held:
    """A message this worker took and has not acknowledged yet."""

    job_id: str
    deliveries: int
    started: int | None = None  # the last attempt seen starting here
    state: str = ""
    status: dict[str, Any] = field(default_factory=dict)
    fresh: bool = True  # read as a new entry (not taken over from a stopped worker)
    lost: bool = False  # another worker holds it now: our outcome is not the job's
    dead: bool = False  # moved to the dead-letter stream (and acked) while held here
    gone: bool = False  # left the stream while held here (trimmed, deleted): ours to finish


class RedisRemote(Remote):
    """Jobs from the pool's stream into the local spool; results and status shared through Redis."""

    name = "redis"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.redis_stream_prefix, settings.pool)
        self.group = settings.redis_group
        self.me = settings.worker_id
        self.spool = Spool(settings)  # read only: the supervisor owns every write
        self.client: redis.Redis | None = None
        self.reader: Any = None  # a redis Connection of its own (redis-py leaves it untyped)
        self.reader_id = 0
        self.sub: Any = None  # a redis PubSub on the cancel channel
        self.sel: selectors.BaseSelector | None = None
        self.fds: list[int] = []  # registered with the selector (redis-py may drop its sockets)
        self._deliver: Deliver | None = None
        self._cancel: Cancel | None = None
        self.scripts: dict[str, Any] = {}
        self.held: dict[str, Held] = {}  # message id -> what we know of it
        self.parked: dict[str, tuple[bytes, int | None, str]] = {}  # waiting for a key's holder
        self.by_job: dict[str, str] = {}  # job id -> message id
        self.foreign: set[str] = set()  # job ids recovered locally whose message is not ours
        self.unsent_results: dict[str, bytes] = {}
        self.unsent_acks: set[str] = set()
        self.dirty: dict[str, dict[str, Any]] = {}  # job id -> status not yet written
        self.acks: list[str] = []  # results stored: acknowledge at the end of the loop pass
        self.arrived: list[tuple[str, dict[bytes, bytes]]] = []  # read, not yet checked
        self.wake = False  # jobs were delivered after the loop filled its slots
        self.given = 0  # messages delivered in this poll
        self.cancels: list[str] = []  # cancel callbacks to make at the next poll
        self.connected = False
        self.first = True
        self.intake = True
        self.error = "not connected yet"
        self.down_since: float | None = None
        self.backoff = BACKOFF_FIRST
        self.retry_at = 0.0
        self.reading = 0  # entries asked for by the XREADGROUP in flight
        self.read_sent = 0.0
        self.read_cut = False  # the read in flight asked for more than there is room for now
        self.next_renew = 0.0
        self.takeover_after = 0.0
        self.next_takeover = 0.0
        self.cursor = "0-0"
        self.profile = b""  # what this worker shows the others (JSON; empty: nothing)
        #: the other live workers, by id: their profile and its fingerprint
        self.peers: dict[str, tuple[dict[str, Any], str]] = {}
        self.peers_seen = 0
        self.handed_here = False  # a worker announced a message handed to this one

    # -- the seam ------------------------------------------------------------------------------

    def open(self, selector: selectors.BaseSelector, deliver: Deliver, cancel: Cancel,
             profile: dict[str, Any] | None = None) -> None:
        """Connect (or schedule reconnects), then recover the messages this worker held."""
        self.sel, self._deliver, self._cancel = selector, deliver, cancel
        self.profile = dumps(profile) if profile else b""
        self._connect(time.monotonic())

    def poll(self, now: float, free_slots: int, running: list[str]) -> None:
        """Reconnect, renew leases, take over dead workers' messages and ask for new ones."""
        self.wake = False
        self.given = 0
        self._run_cancels()
        if not self.connected and (now < self.retry_at or not self._connect(now)):
            return
        try:  # a step whose delivery failed on Redis (see _down) ends the pass
            self._flush()
            if self.connected and now >= self.next_renew:
                self._renew(now)
            if self.connected and self.parked:
                self._unpark()
            if self.connected and self.handed_here:
                self._take_handed()
            if self.connected:  # what this pass delivered has taken slots `free_slots` counted
                self._claim(now, free_slots - len(self.parked) - self.given)
        except ERRORS as e:
            self._down(e, now)
        self._run_cancels()

    def next_deadline(self) -> float | None:
        """The next reconnect, renewal or overdue read reply; now when jobs wait to be started."""
        if self.cancels or self.wake:
            return time.monotonic()
        if not self.connected:
            return self.retry_at
        times = [self.next_renew]
        if self.reading:
            times.append(self.read_sent + BLOCK_MS / 1000 + REPLY_SLACK)
        return min(times)

    def stop_intake(self) -> None:
        """Claim nothing more, and take none handed on; wake the read in flight so its answer
        comes back now."""
        self.intake = False
        if self.client is not None and self.connected:
            try:
                self._advertise()
                if self.reading:
                    self._cut_read()
            except ERRORS as e:
                self._down(e, time.monotonic())

    def close(self) -> None:
        """Give back what was claimed but never started, store what is unsent, disconnect."""
        self.intake = False
        if self.connected:
            try:
                self._finish_read()
                self._flush()
                self._give_back_unstarted()
                self._advertise()
                self._take_handed()
            except ERRORS as e:
                log.warning("redis: could not finish cleanly (%s); held messages will be taken "
                            "over after %.0f s", e, self.settings.redis_claim_idle_seconds)
        self._disconnect()

    def status(self, job_id: str, doc: dict[str, Any]) -> None:
        """Mirror a status write: an attempt's start at once, the rest at the end of the loop pass."""
        mid = self.by_job.get(job_id)
        held = self.held.get(mid) if mid else None
        if held is None or held.lost or held.dead:
            if held is not None and held.dead and doc.get("state") == "assigned":
                self.cancels.append(job_id)
            return
        doc = {**doc, "job_id": job_id, "updated_at": rfc3339(), "message_id": mid}
        held.state, held.status = str(doc.get("state")), doc
        self._count_attempt(mid or "", held, doc)
        self.dirty[job_id] = doc
        if doc.get("state") == "assigned" and self.connected:  # what a takeover counts on
            try:
                self._flush(deliver=False)
            except ERRORS as e:
                self._down(e, time.monotonic())

    def publish(self, job_id: str, doc: dict[str, Any]) -> bool:
        """Store the result with SET NX; False when another result came first or the job is not ours."""
        held = self.held.get(self.by_job.get(job_id, ""))
        self.dirty.pop(job_id, None)
        if job_id in self.foreign or (held is not None and (held.lost or held.dead)):
            return False
        data = dumps(doc)
        if not self.connected:
            self.unsent_results[job_id] = data
            return True
        try:
            stored = self._store_result(job_id, data, doc)
        except ERRORS as e:
            self.unsent_results[job_id] = data
            self._down(e, time.monotonic())
            return True
        return stored

    def acknowledge(self, message_id: str, job_id: str, ok: bool) -> None:
        """The result is stored here and in Redis: XACK and delete the entry at the end of the loop
        pass (unless it is not ours any more)."""
        held = self._forget(message_id)
        if (held is not None and (held.lost or held.dead)) or job_id in self.foreign:
            return  # another worker's message now
        if not self.connected or job_id in self.unsent_results:
            self.unsent_acks.add(message_id)
        else:
            self.acks.append(message_id)

    def forward(self, message_id: str, pool: str, status: dict[str, Any]) -> bool:
        """Put the message on pool `pool`'s stream as a new entry and take it off this one."""
        job_id = self._passable(message_id)
        if job_id is None or self.client is None:
            return False
        stream = Keys(self.keys.prefix, pool).stream
        doc = dumps({**status, "job_id": job_id, "state": "pending", "updated_at": rfc3339(),
                     "stream": stream, "moved_by": self.me})  # unread there, as after submit
        try:
            rows: Any = self.client.xrange(self.keys.stream, message_id, message_id)
            if not rows or not self._give_back(message_id, rows[0][1], stream, doc):
                return False  # gone or not ours any more: the next renewal says which
        except ERRORS as e:  # moved or not: the owner key tells (see _gone)
            self._down(e, time.monotonic())
            return False
        self._let_go(message_id, job_id)
        return True

    def offer(self, message_id: str, fits: Fits,
              status: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
        """Hand the message to a live worker that fits the job (in random order, skipping those
        that declined it before); this worker is noted as one that declined it."""
        job_id = self._passable(message_id)
        if job_id is None:
            return None, {}
        why_not: dict[str, str] = {}
        able = []
        for worker, (profile, mark) in self.peers.items():
            if (why := fits(profile)) is None:
                able.append(f"{worker} {mark}")
            else:
                why_not[worker] = why
        if not able:
            return None, why_not
        random.shuffle(able)
        doc = {**status, "job_id": job_id, "state": "queued", "updated_at": rfc3339(),
               "message_id": message_id, "handed_by": self.me}
        try:
            reply: Any = self.scripts["hand_off"](
                keys=[self.keys.stream, self.keys.declined(job_id), self.keys.status(job_id),
                      self.keys.workers],
                args=[self.group, self.me, message_id, self.settings.redis_status_ttl_seconds,
                      self.settings.redis_status_ttl_seconds, dumps(doc), self.keys.handed(),
                      self.keys.handoff(), self.keys.events(job_id),
                      f"{self.me} {fingerprint(self.profile)}", *able])
        except ERRORS as e:
            self._down(e, time.monotonic())
            return None, why_not
        if reply is None:  # not ours any more: the next renewal says so and stops the copy
            return None, why_not
        to, *stopped = map(_text, reply)
        if not to:
            for worker in (a.rsplit(" ", 1)[0] for a in able):
                why_not[worker] = (f"worker {worker!r} has stopped" if worker in stopped else
                                   f"worker {worker!r} handed it on before")
            return None, why_not
        self._let_go(message_id, job_id)
        return to, why_not

    def _passable(self, message_id: str) -> str | None:
        """The job id of a message this worker holds and may pass on now, else None."""
        held = self.held.get(message_id)
        if held is None or not held.job_id or not self.connected or held.lost or held.dead \
                or held.gone:
            return None
        return held.job_id

    def _let_go(self, message_id: str, job_id: str) -> None:
        """The message went to another worker or stream: forget it here."""
        self._forget(message_id)
        self.dirty.pop(job_id, None)

    def disowned(self, job_id: str) -> bool:
        """Whether another worker (or the stream) has the job's message now."""
        held = self.held.get(self.by_job.get(job_id, ""))
        return job_id in self.foreign or (held is not None and held.lost)

    def reject(self, message_id: str, record: dict[str, Any]) -> None:
        """The supervisor refused the job: dead-letter it with why, share its result, XACK it."""
        held = self._forget(message_id)
        job_id = record.get("job_id")
        result = self._local_rejection(job_id, record) if isinstance(job_id, str) else None
        log.warning("redis: message %s rejected: %s", message_id, record.get("message"),
                    extra={"job_id": job_id})
        if not self.connected:
            return  # still pending: it comes back after the idle time and is rejected again
        try:
            self._bury(message_id, {
                "reason": "rejected", "code": str(record.get("code", ErrorCode.VALIDATION_ERROR)),
                "message": str(record.get("message", "")), "job_id": job_id or "",
                "deliveries": held.deliveries if held else 1,
            }, job_id if result else None, result, self._job_bytes(message_id))
        except ERRORS as e:
            self._down(e, time.monotonic())

    def key_owner(self, key: str) -> str | None:
        """The job holding idempotency `key` in Redis, or None."""
        if self.client is None or not self.connected:
            return None
        try:
            raw = self.client.get(self.keys.idem(key))
        except ERRORS as e:
            self._down(e, time.monotonic())
            return None
        return _text(raw) if raw is not None else None

    def take_key(self, key: str, job_id: str) -> str:
        """Make `job_id` the holder of `key` unless a job that has not failed holds it."""
        if not self.connected:
            return UNREACHABLE
        try:
            holder = self.scripts["take_key"](
                keys=[self.keys.idem(key)],
                args=[job_id, self.settings.redis_result_ttl_seconds, self.keys.result("")])
        except ERRORS as e:
            self._down(e, time.monotonic())
            return UNREACHABLE
        return _text(holder)

    def result(self, job_id: str) -> dict[str, Any] | None:
        """The shared result of `job_id`, or None (also while Redis cannot be asked)."""
        if self.client is None or not self.connected:
            return None
        try:
            return _json(self.client.get(self.keys.result(job_id)))
        except ERRORS as e:
            self._down(e, time.monotonic())
            return None

    def healthy(self) -> tuple[bool, str]:
        """Ready only while Redis answers."""
        if self.connected:
            return True, f"redis {self.keys.stream}"
        return False, f"redis unreachable: {self.error}"

    # -- connection ----------------------------------------------------------------------------

    def _connect(self, now: float) -> bool:
        """Open the command, read and cancel connections; recover held work; False on failure."""
        try:
            client = connect(self.settings.redis_url)
            self.client = client
            client.ping()
            with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists
                client.xgroup_create(self.keys.stream, self.group, id="0", mkstream=True)
            self.scripts = {name: client.register_script(src) for name, src in (
                ("renew", _RENEW), ("count", _COUNT), ("publish", _PUBLISH), ("take_key", _TAKE_KEY),
                ("give_back", _GIVE_BACK), ("advertise", _ADVERTISE), ("hand_off", _HAND_OFF))}
            self._open_reader(client)
            self._open_sub(client)
        except ERRORS as e:
            self._down(e, now)
            return False
        self.connected, self.backoff = True, BACKOFF_FIRST
        if self.down_since is not None:
            log.warning("redis reachable again after %.1f s", now - self.down_since)
        else:
            log.info("redis: serving %s as %s in group %s", self.keys.stream, self.me, self.group)
        self.down_since = None
        self.next_renew = now
        self.takeover_after = now + self.settings.redis_claim_idle_seconds
        try:
            self._resume()
            if self.first:
                self._recover_own()
                self.first = False
            self._advertise()
            self.peers_seen += 1  # what could not be offered while away is offered again
            self.handed_here = True  # announced while away, or before this worker started
            self._check_cancels([h.job_id for h in self.held.values()])
        except ERRORS as e:
            self._down(e, now)
            return False
        return True

    def _open_reader(self, client: redis.Redis) -> None:
        reader: Any = client.connection_pool.make_connection()
        reader.connect()
        reader.send_command("CLIENT", "ID")
        self.reader_id = int(reader.read_response())
        self.reader, self.reading = reader, 0
        self._register(reader._sock.fileno(), self._on_reader)

    def _open_sub(self, client: redis.Redis) -> None:
        sub: Any = PubSub(client.connection_pool, ignore_subscribe_messages=True)
        self.sub = sub
        sub.subscribe(self.keys.cancel_channel, self.keys.handoff(self.me))
        self._register(sub.connection._sock.fileno(), self._on_sub)

    def _register(self, fd: int, callback: Callable[[], None]) -> None:
        assert self.sel is not None
        self.sel.register(fd, selectors.EVENT_READ, callback)
        self.fds.append(fd)

    def _down(self, err: BaseException, now: float) -> None:
        """Redis went away (or misbehaved): drop every connection and retry with back-off."""
        if self.down_since is None:
            self.down_since = now
            log.warning("redis unreachable at %s: %s; reconnecting with back-off, running jobs go "
                        "on", self.settings.redis_url, err)
        else:
            log.debug("redis still unreachable: %s", err)
        self.error = str(err) or type(err).__name__
        self.connected = False
        self.unsent_acks.update(self.acks)
        self.acks.clear()
        self.arrived.clear()  # pending here, unrenewed: taken over after the idle time
        self._disconnect()
        self.retry_at = now + self.backoff * random.uniform(0.8, 1.2)
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def _disconnect(self) -> None:
        while self.fds and self.sel is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.sel.unregister(self.fds.pop())
        if self.reader is not None:
            with contextlib.suppress(*ERRORS):
                self.reader.disconnect()
        if self.sub is not None:
            with contextlib.suppress(*ERRORS):
                self.sub.close()
        if self.client is not None:
            with contextlib.suppress(*ERRORS):
                self.client.close()
        self.client, self.reader, self.sub, self.reading = None, None, None, 0

    def _resume(self) -> None:
        """After a (re)connect: store the results, acks and status that could not be sent."""
        assert self.client is not None
        for job_id, data in list(self.unsent_results.items()):
            stored = self._store_result(job_id, data, _json(data) or {})
            if not stored and self.client.get(self.keys.result(job_id)) != data:  # not our own
                log.warning("redis: job %s: another worker's result was stored before this one "
                            "could reach Redis; the shared result counts (the local result file "
                            "differs from it)", job_id, extra={"job_id": job_id})
            del self.unsent_results[job_id]
        self.acks.extend(self.unsent_acks)
        self.unsent_acks.clear()
        self._flush()

    # -- reading and taking over ----------------------------------------------------------------

    def _claim(self, now: float, free: int) -> None:
        """Fill `free` slots: dead workers' messages first, then new ones (never more than free)."""
        if not self.intake or self.reading or free <= 0:
            if self.reading and now > self.read_sent + BLOCK_MS / 1000 + REPLY_SLACK:
                raise redis.ConnectionError("no reply to XREADGROUP")
            if self.reading > max(free, 0) and not self.read_cut:
                self._cut_read()
            return
        if now >= self.takeover_after and now >= self.next_takeover:
            free -= self._take_over(now, free)
        if free > 0 and self.intake and self.reader is not None:
            self.reader.send_command("XREADGROUP", "GROUP", self.group, self.me, "COUNT", free,
                                     "BLOCK", BLOCK_MS, "STREAMS", self.keys.stream, ">")
            self.reading, self.read_sent, self.read_cut = free, now, False

    def _cut_read(self) -> None:
        """Slots filled while the read waited (a file job, a retry, a handed message): wake it,
        so that what arrives next goes to a worker with room; the next read asks for the room
        there is then. Entries the server already sent still come, as before."""
        assert self.client is not None
        self.client.client_unblock(self.reader_id)
        self.read_cut = True

    def _on_reader(self) -> None:
        """The XREADGROUP in flight answered: its entries are checked and delivered by the
        flush at the end of this loop pass (one round trip for all of them)."""
        if self.reader is None:  # dropped earlier in the same loop pass
            return
        try:
            reply = self.reader.read_response()
        except ERRORS as e:
            self._down(e, time.monotonic())
            return
        self.reading = 0
        self.arrived.extend(_entries(reply))

    def _finish_read(self) -> None:
        """At close: wake the read in flight and give back whatever it brought."""
        if not self.reading or self.reader is None or self.client is None:
            return
        self.client.client_unblock(self.reader_id)
        for mid, fields in _entries(self.reader.read_response()):
            self._give_back(mid, fields)
        self.reading = 0

    def _take_over(self, now: float, free: int) -> int:
        """XAUTOCLAIM messages idle past claim_idle_seconds; deliver them or dead-letter poison."""
        assert self.client is not None
        idle_ms = int(self.settings.redis_claim_idle_seconds * 1000)
        reply: Any = self.client.xautoclaim(self.keys.stream, self.group, self.me, idle_ms,
                                            start_id=self.cursor, count=free)
        self.cursor = _text(reply[0])
        self.next_takeover = now if self.cursor != "0-0" else now + self.settings.redis_renew_seconds
        claimed = [(_text(mid), fields or {}) for mid, fields in reply[1]
                   if _text(mid) not in self.held]
        if not claimed:
            return 0
        counts = self._deliveries([mid for mid, _ in claimed])
        for mid, fields in claimed:
            if self.connected:
                self._take(mid, fields, counts.get(mid, 1), "takeover")
        return len(claimed)

    def _deliveries(self, ids: list[str]) -> dict[str, int]:
        """How often each of `ids` (held by this worker) has been delivered."""
        assert self.client is not None
        rows: Any = self.client.xpending_range(self.keys.stream, self.group, min=min(ids),
                                               max=max(ids),
                                               count=len(ids) + len(self.held) + 16,
                                               consumername=self.me)
        return {_text(r["message_id"]): int(r["times_delivered"]) for r in rows}

    def _take(self, mid: str, fields: dict[bytes, bytes], deliveries: int, how: str) -> None:
        """A message taken over or recovered: check it, then deliver it or settle it here."""
        job = self._parse(mid, fields)
        if job is not None:
            self._settle(mid, job, self._probe(job[2], mid), deliveries, how)

    def _parse(self, mid: str, fields: dict[bytes, bytes]) -> tuple[bytes, dict[str, Any], str | None] | None:
        """(job bytes, document, safe job id) of a message, or None when it was dead-lettered."""
        raw = fields.get(b"job")
        doc = _json(raw) if raw is not None else None
        if raw is None or doc is None or len(raw) > self.settings.max_job_bytes:
            self._bury_malformed(mid, fields, raw, doc)
            return None
        return raw, doc, safe_job_id(doc)

    def _settle(self, mid: str, job: tuple[bytes, dict[str, Any], str | None],
                probe: Probe, deliveries: int, how: str | None) -> None:
        """Deliver a checked message, or settle it here: another message's job id, done
        already, poison, or its key held."""
        raw, doc, job_id = job
        done, cancelled, status, owner = probe
        if job_id and owner and owner != mid:
            self._bury_duplicate(mid, job_id, owner, raw)
            return
        if done:
            log.info("redis: message %s: job %s already has a result; acknowledged", mid, job_id,
                     extra={"job_id": job_id})
            self._ack(mid)
            return
        if how and deliveries > self.settings.redis_max_deliveries:
            self._bury_poison(mid, job_id, raw, doc, deliveries, status)
            return
        held = Held(job_id or "", deliveries, fresh=how is None or ran_before(status) is None)
        key = _idempotency_key(doc)
        if job_id and key and not cancelled and (holder := self._key_holder(key, job_id)):
            self.held[mid] = held
            self.parked[mid] = (raw, ran_before(status) if how else None, key)
            self.dirty[job_id] = {  # shared at the next flush: who waits, here, and for what
                "job_id": job_id, "state": "queued", "worker_id": self.me, "message_id": mid,
                "updated_at": rfc3339(),
                "waiting_for": f"idempotency key {key!r} is held by job {holder!r}, not yet "
                               "finished"}
            return
        self._hand_over(mid, job_id, raw, held, ran_before(status) if how else None)
        if cancelled and job_id and mid in self.held:
            self.cancels.append(job_id)

    def _key_holder(self, key: str, job_id: str) -> str | None:
        """Take the idempotency key for `job_id` before delivery; the unfinished job elsewhere
        that holds it, if one does (the message then waits here, its lease renewed)."""
        holder = self.take_key(key, job_id)
        if holder == UNREACHABLE:
            raise redis.ConnectionError(self.error)
        return None if holder == job_id or self._has_result(holder) else holder

    def _unpark(self) -> None:
        """Deliver the parked jobs whose key's holder has finished."""
        for mid, (raw, running_attempt, key) in list(self.parked.items()):
            held = self.held.get(mid)
            if held is None or held.lost:
                del self.parked[mid]
                continue
            if self._key_holder(key, held.job_id) is None:
                del self.parked[mid]
                self._hand_over(mid, held.job_id, raw, held, running_attempt)
                self._check_cancels([held.job_id])  # one asked for while it was parked

    def _parked_mid(self, job_id: str) -> str | None:
        """The message of `job_id` parked here (waiting for its idempotency key), or None."""
        return next((mid for mid in self.parked
                     if (h := self.held.get(mid)) is not None and h.job_id == job_id), None)

    def _unpark_cancelled(self, mid: str) -> None:
        """A parked job was cancelled: hand it over now, with its cancel (it will not run)."""
        raw, running_attempt, _ = self.parked.pop(mid)
        held = self.held[mid]
        self._hand_over(mid, held.job_id, raw, held, running_attempt)
        if mid in self.held:
            self.cancels.append(held.job_id)

    def _hand_over(self, mid: str, job_id: str | None, raw: bytes, held: Held,
                   running_attempt: int | None) -> None:
        """Give the job to the supervisor (it stores it in the spool first)."""
        assert self._deliver is not None
        self.held[mid] = held
        if job_id:
            self.by_job.setdefault(job_id, mid)
            self.foreign.discard(job_id)  # its message is ours again
        self.given += 1
        try:
            self._deliver(mid, raw, running_attempt)
        except OSError as e:  # the spool cannot take it: leave it to another worker
            log.error("redis: message %s could not be stored in the spool (%s); another worker "
                      "will take it after %.0f s", mid, e, self.settings.redis_claim_idle_seconds)
            self._forget(mid)

    def _give_back(self, mid: str, fields: dict[bytes, bytes], stream: str | None = None,
                   status: bytes = b"") -> bool:
        """Return a message this worker holds and will not run to the stream (or put it on
        `stream`, with the job's new `status`), as a new entry, at once; the new entry carries
        its job id from then on. False when this worker does not hold it (nothing changed)."""
        job_id = safe_job_id(_json(fields.get(b"job")) or {}) or "-"
        moved = self.scripts["give_back"](
            keys=[self.keys.stream, stream or self.keys.stream, self.keys.owner(job_id),
                  self.keys.status(job_id)],
            args=[self.group, mid, self.me, status, self.settings.redis_status_ttl_seconds,
                  self.keys.events(job_id), *(x for kv in fields.items() for x in kv)])
        return moved is not None

    def _give_back_unstarted(self) -> None:
        """At close: messages delivered but never started here go back for the other workers."""
        assert self.client is not None
        for mid, held in list(self.held.items()):
            if held.started is not None or not held.fresh or held.lost or held.dead:
                continue
            rows: Any = self.client.xrange(self.keys.stream, mid, mid)
            if rows and self._give_back(mid, rows[0][1]):
                log.info("redis: job %s went back to the stream unstarted", held.job_id,
                         extra={"job_id": held.job_id})
            elif rows:
                log.info("redis: job %s: another worker took its message over", held.job_id,
                         extra={"job_id": held.job_id})
            self._forget(mid)

    # -- leases, counts, cancels ---------------------------------------------------------------

    def _renew(self, now: float) -> None:
        """Reset the idle time of every message held here; stop what another worker took."""
        assert self.client is not None
        self.next_renew = now + self.settings.redis_renew_seconds
        self._advertise()
        self._take_handed()  # an announcement can be missed: the set is the record
        if not self.connected:
            return
        ids = [m for m, h in self.held.items() if not (h.lost or h.dead or h.gone)]
        if not ids:
            return
        lost, gone = self.scripts["renew"](keys=[self.keys.stream], args=[self.group, self.me, *ids])
        for mid in map(_text, lost):
            self._lose(mid)
        for mid in map(_text, gone):
            self._gone(mid)

    def _advertise(self) -> None:
        """Show this worker's profile while it takes jobs (withdraw it otherwise) for three
        renewal periods (at most claim_idle_seconds), and read the other live workers'."""
        assert self.client is not None
        shown = self.profile if self.intake else b""
        ttl_ms = int(min(self.settings.redis_claim_idle_seconds,
                         3 * self.settings.redis_renew_seconds) * 1000)
        reply: Any = self.scripts["advertise"](keys=[self.keys.workers, self.keys.profiles],
                                               args=[self.me, shown, ttl_ms])
        peers = {}
        for raw in reply:
            doc = _json(raw)
            if doc is not None and doc.get("worker_id") != self.me:
                peers[str(doc.get("worker_id"))] = doc, fingerprint(raw)
        if peers != self.peers:
            self.peers, self.peers_seen = peers, self.peers_seen + 1

    def _take_handed(self) -> None:
        """Take the messages other workers handed to this one, like new ones (while draining,
        give them back to the stream)."""
        assert self.client is not None
        self.handed_here = False
        key = self.keys.handed(self.me)
        for mid in sorted(map(_text, self.client.smembers(key))):
            if mid not in self.held:
                self._take_one_handed(mid)
            if not self.connected or self.client is None:
                return  # the rest stay noted; a reconnection looks again
            self.client.srem(key, mid)

    def _take_one_handed(self, mid: str) -> None:
        assert self.client is not None
        pending: Any = self.client.xpending_range(self.keys.stream, self.group, min=mid, max=mid,
                                                  count=1)
        rows: Any = self.client.xrange(self.keys.stream, mid, mid)
        if not pending or _text(pending[0]["consumer"]) != self.me or not rows:
            return  # taken over, or finished, meanwhile
        if not self.intake:
            self._give_back(mid, rows[0][1])
            return
        if (job := self._parse(mid, rows[0][1])) is not None:
            log.info("redis: job %s: handed to this worker by another", job[2],
                     extra={"job_id": job[2]})
            self._settle(mid, job, self._probe(job[2], mid), int(pending[0]["times_delivered"]),
                         "handoff")
            self.wake = True

    def _gone(self, mid: str) -> None:
        """A message held here is in no worker's hands any more: acknowledged by the worker
        that finished its job (which then has a result), moved on by this one (a reply lost:
        the job's owner key names the new entry), or deleted from the stream (XTRIM, XADD
        MAXLEN, XDEL, FLUSHALL), after which nobody else can run it: finish it here."""
        assert self.client is not None
        held = self.held.get(mid)
        if held is None:
            return
        job_id = held.job_id
        owner = self.client.get(self.keys.owner(job_id)) if job_id else None
        if job_id and self._has_result(job_id):
            self._lose(mid, f"another worker finished it (message {mid})")
            return
        if job_id and owner is not None and _text(owner) != mid:
            self._lose(mid, f"its message {mid} was moved on, as entry {_text(owner)}")
            return
        held.gone = True
        log.warning("redis: job %s: its message %s left the stream while it ran here (trimmed or "
                    "deleted); it finishes here and its result is stored", job_id, mid,
                    extra={"job_id": job_id})

    def _lose(self, mid: str, why: str = "") -> None:
        """Message `mid` is not this worker's any more (`why`): stop the local copy."""
        if mid in self.parked:  # never delivered here: nothing to stop
            self._forget(mid)
            return
        held = self.held.get(mid)
        if held is None:
            return
        held.lost = True
        job_id = held.job_id
        why = why or (f"another worker holds message {mid} now (this worker was taken for "
                      "dead)")
        log.warning("redis: job %s: %s; stopping this copy", job_id, why, extra={"job_id": job_id})
        if job_id:
            self.cancels.append(job_id)

    def _count_attempt(self, mid: str, held: Held, doc: dict[str, Any]) -> None:
        """Count each execution start as a delivery; dead-letter before one too many starts."""
        state, attempt = doc.get("state"), doc.get("attempt")
        if not isinstance(attempt, int) or held.lost or held.gone:  # gone: nothing to count on
            return
        if state == "assigned":
            if held.started is not None and attempt > held.started and self.connected:
                self._count_again(mid, held)
            held.started = attempt
        elif (state == "queued" and held.started is not None and attempt > held.started
              and held.deliveries >= self.settings.redis_max_deliveries and self.connected):
            self._bury_held(mid, held, doc)

    def _count_again(self, mid: str, held: Held) -> None:
        try:
            n = int(self.scripts["count"](keys=[self.keys.stream], args=[self.group, self.me, mid]))
        except ERRORS as e:
            self._down(e, time.monotonic())
            return
        if n < 0:
            self._lose(mid)
        else:
            held.deliveries = n

    def _on_sub(self) -> None:
        """Cancel requests announced on the channel: pass on those for jobs held here."""
        sub = self.sub
        if sub is None or sub.connection is None:  # dropped earlier in the same loop pass
            return
        try:
            while True:
                msg = sub.get_message(timeout=0.0)
                if msg is None and not sub.connection.can_read(timeout=0):
                    break
                if msg and msg.get("type") == "message" and \
                        _text(msg["channel"]) == self.keys.handoff(self.me):
                    self.handed_here = True
                elif msg and msg.get("type") == "message":
                    job_id = _text(msg["data"])
                    if job_id in self.by_job:
                        self.cancels.append(job_id)
                    elif (mid := self._parked_mid(job_id)) is not None:
                        self._unpark_cancelled(mid)
        except ERRORS as e:
            self._down(e, time.monotonic())
        self._run_cancels()

    def _check_cancels(self, job_ids: list[str]) -> None:
        """Pass on cancel requests stored for `job_ids` (asked before delivery or while away)."""
        if not job_ids or self.client is None:
            return
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(self.keys.cancel(job_id))
        for job_id, found in zip(job_ids, pipe.execute(), strict=True):
            if found:
                self.cancels.append(job_id)

    def _run_cancels(self) -> None:
        while self.cancels and self._cancel is not None:
            self._cancel(self.cancels.pop(0))

    # -- writing ---------------------------------------------------------------------------------

    def _flush(self, deliver: bool = True) -> None:
        """One round trip: status writes, acknowledgements, and (when `deliver`, i.e. not inside
        a supervisor call) the checks of new arrivals, which are then delivered."""
        if self.client is None or not (self.dirty or self.acks or (deliver and self.arrived)):
            return
        arrived = [(mid, job) for mid, fields in (self._take_arrived() if deliver else [])
                   if (job := self._parse(mid, fields)) is not None]
        pipe = self.client.pipeline(transaction=False)
        ttl = self.settings.redis_status_ttl_seconds
        for job_id, doc in self.dirty.items():
            data = dumps(doc)
            pipe.set(self.keys.status(job_id), data, ex=ttl)
            pipe.publish(self.keys.events(job_id), data)
        for mid in self.acks:
            pipe.xack(self.keys.stream, self.group, mid)
            pipe.xdel(self.keys.stream, mid)
        for mid, (_, _, jid) in arrived:
            self._probe_into(pipe, jid or "", mid)
        replies = pipe.execute()
        self.dirty.clear()
        self.acks.clear()
        probes = replies[len(replies) - PROBE_OPS * len(arrived):]
        for i, (mid, job) in enumerate(arrived):
            if not self.connected:
                break
            self._settle(mid, job, _probe_reply(probes[PROBE_OPS * i:PROBE_OPS * (i + 1)]), 1, None)
            self.wake = True

    def _take_arrived(self) -> list[tuple[str, dict[bytes, bytes]]]:
        """The entries read since the last flush; given back at once when intake is closed."""
        arrived, self.arrived = self.arrived, []
        if self.intake:
            return arrived
        for mid, fields in arrived:
            self._give_back(mid, fields)
        return []

    def _store_result(self, job_id: str, data: bytes, doc: dict[str, Any]) -> bool:
        """SET NX the result; when stored, the status becomes terminal and followers hear it."""
        final = dumps(_final_status(job_id, doc, self.me))
        stored = self.scripts["publish"](
            keys=[self.keys.result(job_id), self.keys.status(job_id)],
            args=[data, self.settings.redis_result_ttl_seconds, final,
                  self.settings.redis_status_ttl_seconds, self.keys.events(job_id)])
        return bool(stored)

    def _ack(self, mid: str) -> None:
        assert self.client is not None
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.keys.stream, self.group, mid)
        pipe.xdel(self.keys.stream, mid)
        pipe.execute()

    def _forget(self, mid: str) -> Held | None:
        self.parked.pop(mid, None)
        held = self.held.pop(mid, None)
        if held is not None and self.by_job.get(held.job_id) == mid:
            del self.by_job[held.job_id]
        return held

    # -- dead letters ----------------------------------------------------------------------------

    def _bury(self, mid: str, record: dict[str, Any], job_id: str | None,
              result: dict[str, Any] | None, raw: bytes | None = None) -> None:
        """Dead-letter `mid` with `record`, store `result` when given, and XACK it, in one MULTI."""
        assert self.client is not None
        entry: dict[Any, Any] = {k: v if isinstance(v, bytes | str | int | float) else dumps(v)
                                 for k, v in record.items() if v is not None}
        entry.update(message_id=mid, stream=self.keys.stream, worker=self.me, dead_at=rfc3339())
        if raw is not None:
            entry["job"] = raw
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.keys.dead, entry, maxlen=DEAD_MAXLEN, approximate=True)
        if job_id and result is not None:
            pipe.set(self.keys.result(job_id), dumps(result), nx=True,
                     ex=self.settings.redis_result_ttl_seconds)
            pipe.set(self.keys.status(job_id), dumps(_final_status(job_id, result, self.me)),
                     ex=self.settings.redis_status_ttl_seconds)
        pipe.xack(self.keys.stream, self.group, mid)
        pipe.xdel(self.keys.stream, mid)
        pipe.execute()

    def _failed(self, job_id: str, code: ErrorCode, message: str, phase: str,
                details: dict[str, Any] | None = None, attempt: int = 1,
                max_attempts: int = 1) -> dict[str, Any]:
        end = Ending(job_id=job_id, status="failed", code=code, message=message, phase=phase,
                     details=details, attempt=attempt, max_attempts=max_attempts)
        return build(end, self.settings)

    def _bury_malformed(self, mid: str, fields: dict[bytes, bytes], raw: bytes | None,
                        doc: dict[str, Any] | None) -> None:
        """A message that is no job at all: record why, share a result if its id is usable, XACK."""
        names = sorted(_text(k) for k in fields)
        if raw is None:
            why = f"message {mid}: no 'job' field (fields: {', '.join(names) or 'none'})"
        elif len(raw) > self.settings.max_job_bytes:
            why = (f"message {mid}: the job is {len(raw)} bytes, over the limit of "
                   f"{self.settings.max_job_bytes}")
        else:
            why = f"message {mid}: the 'job' field is not a JSON object: {_not_an_object(raw)}"
        job_id = safe_job_id(doc) if doc is not None else None
        result = self._failed(job_id, ErrorCode.VALIDATION_ERROR, f"job {job_id!r}: {why}",
                              "validation") if job_id else None
        log.warning("redis: %s; moved to %s", why, self.keys.dead, extra={"job_id": job_id})
        self._bury(mid, {"reason": "malformed", "code": ErrorCode.VALIDATION_ERROR.value,
                         "message": why, "job_id": job_id or "", "fields": dumps(names)},
                   job_id, result, raw[: self.settings.max_job_bytes] if raw else None)

    def _bury_poison(self, mid: str, job_id: str | None, raw: bytes, doc: dict[str, Any],
                     deliveries: int, status: dict[str, Any] | None) -> None:
        """Taken over once too often: every worker that ran it stopped; dead-letter it."""
        last = status or {}
        why = (f"job {job_id!r}: delivered {deliveries} times (max_deliveries "
               f"{self.settings.redis_max_deliveries}); the worker running it stopped each time "
               f"(last: {last.get('worker_id', 'unknown')}, state {last.get('state', 'unknown')}, "
               f"attempt {last.get('attempt', '?')})")
        self._bury_with_history(mid, job_id, raw, doc, deliveries, last, ErrorCode.WORKER_LOST, why)

    def _bury_held(self, mid: str, held: Held, doc: dict[str, Any]) -> None:
        """A job held here is about to start once too often: dead-letter it and stop it here."""
        assert self.client is not None
        why = (f"job {held.job_id!r}: started {held.deliveries} times (max_deliveries "
               f"{self.settings.redis_max_deliveries}) and no attempt finished; attempt "
               f"{doc.get('attempt')} of {doc.get('max_attempts')} was next")
        try:
            raw = self._job_bytes(mid) or b""
            self._bury_with_history(mid, held.job_id, raw, _json(raw) or {}, held.deliveries,
                                    doc, ErrorCode.EXECUTION_ERROR, why)
        except ERRORS as e:
            self._down(e, time.monotonic())
            return
        held.dead = True
        self.cancels.append(held.job_id)

    def _bury_with_history(self, mid: str, job_id: str | None, raw: bytes, doc: dict[str, Any],
                           deliveries: int, last: dict[str, Any], code: ErrorCode, why: str) -> None:
        ex: dict[str, Any] = doc["execution"] if isinstance(doc.get("execution"), dict) else {}
        attempt = int(last["attempt"]) if isinstance(last.get("attempt"), int) else 1
        history = {"deliveries": deliveries, "max_deliveries": self.settings.redis_max_deliveries,
                   "last_worker": last.get("worker_id"), "last_state": last.get("state"),
                   "last_attempt": attempt, "dead_letter_stream": self.keys.dead}
        result = self._failed(job_id, code, why, "queue", history, attempt,
                              int(ex.get("max_attempts") or 1)) if job_id else None
        log.error("redis: %s; moved to %s", why, self.keys.dead, extra={"job_id": job_id})
        self._bury(mid, {"reason": "poison", "code": code.value, "message": why,
                         "job_id": job_id or "", "deliveries": deliveries,
                         "last_worker": str(last.get("worker_id", "")),
                         "last_status": dumps(last)}, job_id, result, raw)

    def _bury_duplicate(self, mid: str, job_id: str, owner: str, raw: bytes) -> None:
        """A second message with a job id another message carries: dead-letter it, touching
        neither that job's result nor its status (the submitter finds why here)."""
        why = (f"job {job_id!r}: field 'job_id': duplicate; message {owner} carries a job "
               "with this id (a job id is never reused)")
        log.warning("redis: message %s: %s; moved to %s", mid, why, self.keys.dead,
                    extra={"job_id": job_id})
        self._bury(mid, {"reason": "duplicate", "code": ErrorCode.VALIDATION_ERROR.value,
                         "message": why, "job_id": job_id, "duplicate_of": owner}, None, None, raw)

    def _local_rejection(self, job_id: str, record: dict[str, Any]) -> dict[str, Any] | None:
        """The failed result the intake wrote for this rejection, if it wrote one (not a duplicate)."""
        doc = self.spool.read_result(job_id)
        error = (doc or {}).get("error") or {}
        return doc if error.get("message") == record.get("message") else None

    # -- recovery at start -------------------------------------------------------------------------

    def _recover_own(self) -> None:
        """Settle what this worker held before it stopped, against what its spool recovered."""
        assert self.client is not None
        local = self._local_claims()
        rows: Any = self.client.xpending_range(self.keys.stream, self.group, min="-", max="+",
                                               count=100_000, consumername=self.me)
        mine = {_text(r["message_id"]): int(r["times_delivered"]) for r in rows}
        kept = 0
        for mid, count in mine.items():
            if mid in local and local[mid] and self._has_result(local[mid]):
                self._ack(mid)
                self._disown(mid, local[mid])
            elif mid in local:  # the supervisor runs it from its spool
                kept += 1
                self._hold_recovered(mid, local[mid], count)
            else:
                self._recover_message(mid, count)
        for mid, job_id in local.items():
            if mid not in mine:
                self._disown(mid, job_id)
        if kept:
            log.info("redis: %d job(s) recovered from the spool keep their messages", kept)

    def _hold_recovered(self, mid: str, job_id: str, count: int) -> None:
        """A message still ours whose job the spool brought back: held as if delivered, so that
        its status is shared again and a start after the crash counts as a delivery (the run
        the stopped worker was in is the last one started here)."""
        # the last start, as the spool's recovery left the job's status
        started = ran_before(self.spool.read_status(job_id)) if job_id else None
        self.held[mid] = Held(job_id, count, started=started, fresh=False)
        if job_id:
            self.by_job[job_id] = mid

    def _recover_message(self, mid: str, count: int) -> None:
        """A message held here that the spool does not have: store its result, or deliver it again."""
        assert self.client is not None
        rows: Any = self.client.xrange(self.keys.stream, mid, mid)
        if not rows:
            self._ack(mid)  # deleted from the stream: nothing to run
            return
        fields = rows[0][1]
        job_id = safe_job_id(_json(fields.get(b"job")) or {})
        local = self.spool.read_result(job_id) if job_id else None
        if job_id and local is not None and not self._has_result(job_id):
            self._store_result(job_id, dumps(local), local)
        if job_id and local is not None:
            self._ack(mid)
            return
        self._take(mid, fields, count, "recovery")

    def _disown(self, mid: str, job_id: str) -> None:
        """The spool brought back a job whose message is no longer ours: stop the local copy."""
        if not job_id:
            return
        self.foreign.add(job_id)
        self.cancels.append(job_id)
        log.warning("redis: job %s: its message %s went back to the stream or to another worker "
                    "while this one was stopped; dropping the local copy", job_id, mid,
                    extra={"job_id": job_id})

    def _local_claims(self) -> dict[str, str]:
        """message id -> job id of the jobs from the stream that the spool holds as claimed."""
        out: dict[str, str] = {}
        with contextlib.suppress(FileNotFoundError):
            for where, claimed in self.spool.claimed():
                mid = self.spool.message_of(claimed)
                if mid is None:
                    continue
                try:
                    doc = _json(self.spool.read(where, claimed))
                except OSError:
                    continue
                out[mid] = safe_job_id(doc or {}) or ""
        return out

    # -- small reads -----------------------------------------------------------------------------

    def _has_result(self, job_id: str) -> bool:
        assert self.client is not None
        return bool(self.client.exists(self.keys.result(job_id)))

    def _probe(self, job_id: str | None, mid: str) -> Probe:
        """A job's probe (see `_probe_into`) for message `mid`, in one round trip."""
        if not job_id:
            return False, False, None, None
        assert self.client is not None
        pipe = self.client.pipeline(transaction=False)
        self._probe_into(pipe, job_id, mid)
        return _probe_reply(pipe.execute())

    def _probe_into(self, pipe: Any, job_id: str, mid: str) -> None:
        """Queue PROBE_OPS commands on `pipe`: whether the job has a result, whether a cancel
        is requested, its shared status, and which message carries it (made `mid` when none
        did: SET NX, then GET). An empty id reads and makes nothing that exists."""
        pipe.exists(self.keys.result(job_id or "-"))
        pipe.exists(self.keys.cancel(job_id or "-"))
        pipe.get(self.keys.status(job_id or "-"))
        if job_id:
            pipe.set(self.keys.owner(job_id), mid, nx=True,
                     ex=self.settings.redis_result_ttl_seconds)
        else:
            pipe.exists(self.keys.owner("-"))
        pipe.get(self.keys.owner(job_id or "-"))

    def _job_bytes(self, mid: str) -> bytes | None:
        """The `job` field of a message still in the stream."""
        assert self.client is not None
        rows: Any = self.client.xrange(self.keys.stream, mid, mid)
        return rows[0][1].get(b"job") if rows else None


class QueueError(Exception):
    """A client request the queue refuses, with the reason."""


class Queue:
    """What the client commands do against Redis: submit, read status and results, cancel."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.redis_stream_prefix, settings.pool)
        self.client = connect(settings.redis_url, timeout=10.0)

    def submit(self, job_id: str, raw: bytes, pool: str) -> str:
        """Record the job as pending and XADD it to `pool`'s stream; return the message id."""
        stream = Keys(self.keys.prefix, pool).stream
        if self.client.exists(self.keys.result(job_id)):
            raise QueueError(f"job {job_id!r} has already finished (see `result {job_id}`)")
        pending = dumps({"job_id": job_id, "state": "pending", "stream": stream,
                         "updated_at": rfc3339()})
        if not self.client.set(self.keys.status(job_id), pending, nx=True,
                               ex=self.settings.redis_status_ttl_seconds):
            raise QueueError(f"job {job_id!r} is already in the queue")
        return _text(self.client.xadd(stream, {"job": raw}))

    def status(self, job_id: str) -> dict[str, Any] | None:
        """The job's live (or last) status."""
        return _json(self.client.get(self.keys.status(job_id)))

    def result(self, job_id: str) -> dict[str, Any] | None:
        """The job's result document."""
        return _json(self.client.get(self.keys.result(job_id)))

    def rows(self) -> list[dict[str, Any]]:
        """Every job Redis knows: its status, else a summary of its result."""
        statuses = self._all(self.keys.status("*"))
        rows = list(statuses.values())
        for job_id, res in self._all(self.keys.result("*")).items():
            if job_id in statuses:
                continue
            summary = res.get("execution_summary") or {}
            rows.append({"job_id": job_id, "state": res.get("status", "?"),
                         "attempt": summary.get("attempt"),
                         "max_attempts": summary.get("max_attempts"),
                         "detail": (res.get("error") or {}).get("code", "")})
        return sorted(rows, key=lambda r: str(r.get("job_id")))

    def _all(self, pattern: str) -> dict[str, dict[str, Any]]:
        names = [_text(n) for n in self.client.scan_iter(match=pattern, count=1000)]
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(names), 500):
            chunk = names[i:i + 500]
            values: Any = self.client.mget(chunk)
            for name, raw in zip(chunk, values, strict=True):
                doc = _json(raw)
                if doc is not None:
                    out[name.rsplit(":", 1)[1]] = {"job_id": name.rsplit(":", 1)[1], **doc}
        return out

    def cancel(self, job_id: str) -> bool:
        """Store a cancel request and announce it to every worker; whether the job is known
        (it has a status: submitted, read or running)."""
        if self.client.exists(self.keys.result(job_id)):
            raise QueueError(f"job {job_id!r} has already finished")
        self.client.set(self.keys.cancel(job_id), rfc3339(), ex=self.settings.redis_status_ttl_seconds)
        self.client.publish(self.keys.cancel_channel, job_id)
        return bool(self.client.exists(self.keys.status(job_id)))

    def follow(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Yield the job's status each time it changes (or every second) until it has a result."""
        sub: Any = PubSub(self.client.connection_pool, ignore_subscribe_messages=True)
        sub.subscribe(self.keys.events(job_id))
        try:
            while not self.client.exists(self.keys.result(job_id)):
                yield self.status(job_id) or {"job_id": job_id, "state": "pending"}
                sub.get_message(timeout=1.0)
                while sub.get_message(timeout=0.0) is not None:
                    pass
        finally:
            sub.close()

    def close(self) -> None:
        """Disconnect."""
        self.client.close()
