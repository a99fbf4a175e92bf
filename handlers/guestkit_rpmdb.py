"""The installed-package list of an rpm sqlite database, read as data (no rpm binary is run).

rpm 4.16+ keeps one header blob per package in the `Packages` table of `rpmdb.sqlite`.
A header blob is: index count and data length (big-endian u32 each), then 16-byte index
entries (tag, type, offset, count) and the data store they point into.
"""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["RpmdbError", "parse_header", "read_packages"]

_TAGS = {1000: "name", 1001: "version", 1002: "release", 1003: "epoch", 1004: "summary",
         1022: "arch", 1008: "install_time"}
_INT32, _STRING, _I18NSTRING = 4, 6, 9
_MAX_INDEX = 0xFFFF
_MAX_DATA = 256 * 1024 * 1024
_SQLITE_MAGIC = b"SQLite format 3\0"
_MAX_SQL_STEPS = 1_000_000_000  #: sqlite VM instructions the package query may take
_STEP_CHECK = 100_000  #: instructions between two checks of that budget


class RpmdbError(ValueError):
    """Raised when the database or a header blob is not what rpm writes."""


def parse_header(blob: bytes) -> dict[str, Any]:
    """Decode the tags we report (name, version, release, epoch, arch, ...) from a header blob."""
    if len(blob) < 8:
        raise RpmdbError("header blob shorter than its preamble")
    count, dlen = struct.unpack_from(">II", blob, 0)
    store = 8 + 16 * count
    if count > _MAX_INDEX or dlen > _MAX_DATA or store + dlen > len(blob):
        raise RpmdbError(f"header blob sizes out of range (index {count}, data {dlen})")
    out: dict[str, Any] = {}
    for i in range(count):
        tag, typ, off, cnt = struct.unpack_from(">iiii", blob, 8 + 16 * i)
        key = _TAGS.get(tag)
        if key is None or key in out or not 0 <= off < dlen:  # a tag read again costs a scan
            continue
        if typ in (_STRING, _I18NSTRING):
            end = blob.find(b"\0", store + off, store + dlen)
            if end >= 0:
                out[key] = blob[store + off:end].decode("utf-8", "replace")
        elif typ == _INT32 and cnt >= 1 and off + 4 <= dlen:
            out[key] = struct.unpack_from(">i", blob, store + off)[0]
    return out


def _check_stored(con: Any) -> None:
    """RpmdbError unless Packages.blob is stored data: a view, a virtual table or a generated
    column runs the guest's own expression when read, which may never end or fill memory."""
    kind = con.execute("SELECT type, sql FROM sqlite_master WHERE name = 'Packages'").fetchone()
    if kind is None:
        raise RpmdbError("it has no Packages table")
    if kind[0] != "table" or "VIRTUAL" in str(kind[1]).upper():
        raise RpmdbError(f"its Packages is a {'virtual table' if kind[0] == 'table' else kind[0]}, "
                         "not a table")
    columns = {row[1]: row[6] for row in con.execute("PRAGMA table_xinfo(Packages)")}
    if columns.get("blob", 0) != 0:
        raise RpmdbError("its Packages.blob is computed when read (a generated column), not stored")


def read_packages(db: bytes) -> list[dict[str, Any]]:
    """Every package header in an rpmdb.sqlite image, sorted by name; RpmdbError if unreadable."""
    import sqlite3  # imported by the image library's warm-up: not in the supervisor

    if not db.startswith(_SQLITE_MAGIC):
        raise RpmdbError("not an sqlite database")
    if db[18:20] == b"\x02\x02":  # WAL mode: read the main file as a rollback-journal db
        db = db[:18] + b"\x01\x01" + db[20:]
    con = sqlite3.connect(":memory:")
    try:
        con.deserialize(db)
        con.execute("PRAGMA trusted_schema = OFF")
        con.execute("PRAGMA query_only = ON")
        con.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, _MAX_DATA)
        _check_stored(con)
        steps = iter(range(_MAX_SQL_STEPS // _STEP_CHECK))
        con.set_progress_handler(lambda: next(steps, None) is None, _STEP_CHECK)
        rows = con.execute("SELECT blob FROM Packages").fetchall()
    except sqlite3.Error as exc:
        if str(exc) == "interrupted":
            raise RpmdbError(f"reading its Packages table took over {_MAX_SQL_STEPS} sqlite "
                             "steps") from None
        raise RpmdbError(f"sqlite: {exc}") from None
    finally:
        con.close()
    packages = []
    for (blob,) in rows:
        if not isinstance(blob, bytes):
            continue
        header = parse_header(blob)
        if header.get("name") and header["name"] != "gpg-pubkey":
            packages.append(header)
    return sorted(packages, key=lambda p: (p["name"], p.get("version", "")))
