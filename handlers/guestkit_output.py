"""Report files: where a report may go (inside the output directory) and how it is written.

A report is written whole or not at all: a temporary file beside the destination,
fsync, then rename. JSON or YAML (a small emitter for the plain data a report holds),
optionally gzip-compressed.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path
from typing import Any

from handlers.guestkit_image import OutputSpec
from worker.errors import HandlerError

__all__ = [
    "check_destination", "choose_destination", "report_destination", "to_yaml", "write_report",
]

_PLAIN_YAML = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./@+-]*$")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "~", "y", "n"}


def check_destination(raw: str, out_dir: Path | None, field_name: str) -> Path:
    """Resolve a destination (relative ones are under `out_dir`) and require it inside `out_dir`."""
    if out_dir is None:
        raise HandlerError(f"{field_name}: no output directory is configured on this worker")
    if not raw.strip() or "\0" in raw:
        raise HandlerError(f"{field_name}: must be a non-empty path")
    real = Path(os.path.realpath(out_dir / raw))
    if out_dir not in real.parents:
        raise HandlerError(f"{field_name}: {raw!r} resolves outside the output directory "
                           f"'{out_dir}'" + (f" (it resolves to '{real}')" if str(real) != raw else ""))
    if real.is_dir():
        raise HandlerError(f"{field_name}: {raw!r} is a directory; name a file")
    return real


def report_destination(destination: str, out_dir: Path | None, image: Path) -> Path:
    """The checked `output.destination`: inside `out_dir`, and never the image itself."""
    dest = check_destination(destination, out_dir, "payload.data.output.destination")
    if dest == image:
        raise HandlerError(f"payload.data.output.destination: '{dest}' is the image itself")
    return dest


def choose_destination(output: OutputSpec | None, out_dir: Path | None, job_dir: Path,
                       default_stem: str, image: Path) -> Path:
    """`output.destination` checked against `out_dir`, else `<default_stem>.json|yaml` in `job_dir`."""
    if output and output.destination:
        return report_destination(output.destination, out_dir, image)
    suffix = ".yaml" if output and output.format == "yaml" else ".json"
    return check_destination(default_stem + suffix, Path(os.path.realpath(job_dir)), "output")


def write_report(dest: Path, report: Any, output: OutputSpec | None) -> Path:
    """Write `report` atomically as JSON or YAML (gzip when asked); return the path written."""
    fmt = output.format if output else "json"
    text = to_yaml(report) if fmt == "yaml" else json.dumps(report, indent=2, default=str) + "\n"
    data = text.encode()
    if output and output.compression == "gzip":
        data = gzip.compress(data, mtime=0)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def to_yaml(value: Any, indent: int = 0) -> str:
    """YAML for JSON-like data (dicts, lists, str, numbers, bool, None), block style."""
    pad = " " * indent
    if isinstance(value, dict) and value:
        lines = []
        for key, item in value.items():
            head = f"{pad}{_yaml_scalar(str(key))}:"
            lines.append(head + _yaml_child(item, indent))
        return "\n".join(lines) + ("\n" if indent == 0 else "")
    if isinstance(value, list) and value:
        lines = []
        for item in value:
            if isinstance(item, dict | list) and item:
                block = to_yaml(item, indent + 2).rstrip("\n")
                lines.append(f"{pad}- {block[indent + 2:]}")
            else:
                lines.append(f"{pad}- {_yaml_scalar(item)}")
        return "\n".join(lines) + ("\n" if indent == 0 else "")
    return pad + _yaml_scalar(value) + ("\n" if indent == 0 else "")


def _yaml_child(item: Any, indent: int) -> str:
    """The text after `key:` or `-`: a scalar on the same line, or a nested block."""
    if isinstance(item, dict | list) and item:
        return "\n" + to_yaml(item, indent + 2)
    return " " + _yaml_scalar(item)


def _yaml_scalar(value: Any) -> str:
    """A YAML scalar: plain when unambiguous, else a JSON string (valid YAML)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, dict | list):
        return "{}" if isinstance(value, dict) else "[]"
    text = str(value)
    if _PLAIN_YAML.fullmatch(text) and text.lower() not in _YAML_WORDS:  # `$` passes a final \n
        return text
    return json.dumps(text)
