"""`guestkit.convert`: convert a disk image to another format with qemu-img, into the output dir.

The source is never written: the target must resolve inside the output directory and
must not be the source or any file of its backing chain. qemu-img writes a hidden
temporary file that is renamed into place only after it succeeded. It runs in the
job's process group (and dies with its parent), so killing the job kills it too.
"""

from __future__ import annotations

import ctypes
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from handlers.base import Context, Handler, HandlerResult
from handlers.guestkit_image import (
    ImageSpec,
    anchored_settings,
    chain_paths,
    check_image_spec,
    image_roots,
    open_chain,
    output_root,
    verify_checksum,
)
from handlers.guestkit_output import check_destination
from worker.errors import HandlerError

__all__ = ["ConvertHandler", "ConvertPayload", "ConvertTarget"]

#: Target formats: our name → (qemu-img driver, file extension).
_TARGETS = {"qcow2": ("qcow2", "qcow2"), "raw": ("raw", "raw"), "img": ("raw", "img"),
            "vmdk": ("vmdk", "vmdk"), "vdi": ("vdi", "vdi"), "vhdx": ("vhdx", "vhdx"),
            "vhd": ("vpc", "vhd"), "vpc": ("vpc", "vhd")}
_QEMU_SOURCE = {"qcow2": "qcow2", "raw": "raw", "vmdk": "vmdk", "vdi": "vdi", "vhdx": "vhdx",
                "vhd": "vpc"}
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_PR_SET_PDEATHSIG = 1


class ConvertTarget(BaseModel):
    """`payload.data.target`: the format, and a path or a file name in the output directory."""

    model_config = ConfigDict(extra="ignore")
    format: str
    path: str | None = None
    name: str | None = None

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        """Accept the target formats qemu-img writes (lower-cased)."""
        if value.lower() not in _TARGETS:
            raise ValueError(f"unsupported target format {value!r}; use one of {sorted(_TARGETS)}")
        return value.lower()

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        """A target name is a bare file name in the output directory."""
        if value is not None and (not value or "/" in value or value in (".", "..") or "\0" in value):
            raise ValueError("must be a plain file name (no '/')")
        return value


class ConvertPayload(BaseModel):
    """`payload.data` of guestkit.convert.v1 (the original's `target_format`/`compression` too)."""

    model_config = ConfigDict(extra="ignore")
    image: ImageSpec
    target: ConvertTarget | None = None
    target_format: str | None = None
    compress: bool = False
    compression: bool | None = None
    verify: bool = False

    @model_validator(mode="after")
    def _target_and_compression(self) -> ConvertPayload:
        """Fill `target` from the original's `target_format`; compress only qcow2."""
        if self.target is None:
            if not self.target_format:
                raise ValueError("target is required: {format, path or name}")
            self.target = ConvertTarget(format=self.target_format)
        self.compress = self.compress or bool(self.compression)
        if self.compress and self.target.format != "qcow2":
            raise ValueError("compress is only supported for the qcow2 target format")
        return self


def _destination(payload: ConvertPayload, source: Path, out_dir: Path | None) -> Path:
    """The checked target path: inside the output directory and not the source."""
    target = payload.target
    assert target is not None
    ext = _TARGETS[target.format][1]
    raw = target.path or target.name or f"{source.stem}.{ext}"
    field_name = "payload.data.target." + ("path" if target.path else "name")
    dest = check_destination(raw, out_dir, field_name)
    if dest == source:
        raise HandlerError(f"{field_name}: '{dest}' is the source image; it is never overwritten")
    return dest


def _check_file_size_limit(virtual_size: int | None, dest: Path) -> None:
    """Fail up front when a raw target would pass this job's file-size limit (RLIMIT_FSIZE)."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if virtual_size and limit != resource.RLIM_INFINITY and virtual_size > limit:
        raise HandlerError(f"payload.data.target: a raw '{dest.name}' is {virtual_size} bytes but "
                           f"this job may write files of at most {limit} bytes (max_file_size_mb); "
                           "convert to qcow2 or raise the limit")


def _exit_text(rc: int) -> str:
    """'exit 1', or the signal that killed the process (SIGXFSZ: the file-size limit)."""
    if rc >= 0:
        return f"exit {rc}"
    name = signal.Signals(-rc).name
    hint = ": the job's file-size limit (max_file_size_mb) was reached" if name == "SIGXFSZ" else ""
    return f"killed by {name}{hint}"


def _die_with_parent() -> None:
    """In qemu-img's process: get SIGKILL when the job process dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class ConvertHandler(Handler):
    """Converts a disk image with `qemu-img convert -p`, reporting its progress."""

    name = "guestkit-convert"
    operations = ("guestkit.convert",)
    payload_types = ("guestkit.convert.v1",)
    payload_model = ConvertPayload
    capabilities = ("disk.qcow2", "disk.raw", "disk.vmdk", "disk.vdi", "disk.vhdx", "disk.vhd")

    def __init__(self, settings: Mapping[str, Any]) -> None:
        """Keep the settings with the image roots and output dir made absolute now."""
        super().__init__(anchored_settings(settings))

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Unavailable without the qemu-img binary."""
        if shutil.which("qemu-img") is None:
            return "guestkit.convert needs qemu-img (Debian package qemu-utils)"
        return None

    def validate(self, data: Any) -> ConvertPayload:
        """Check the payload, the source against the image roots and the target path."""
        payload = ConvertPayload.model_validate(data)
        source = check_image_spec(payload.image, self.settings)
        _destination(payload, source, output_root(self.settings))
        return payload

    def input_paths(self, payload: Any) -> list[str]:
        """The image file and its backing chain: the only files outside its dirs a job reads."""
        return chain_paths(payload.image, self.settings)

    def execute(self, ctx: Context, payload: Any) -> HandlerResult:
        """Convert into the output directory, reporting qemu-img progress; never over the source."""
        payload = payload if isinstance(payload, ConvertPayload) else self.validate(payload)
        assert payload.target is not None
        started = time.monotonic()
        ctx.report_progress("validation", 2, "checking the source and target")
        source = check_image_spec(payload.image, self.settings)
        dest = _destination(payload, source, output_root(self.settings))
        src_format, virtual_size = self._check_chain(source, dest)
        if payload.target.format in ("raw", "img"):
            _check_file_size_limit(virtual_size, dest)
        if payload.image.checksum:
            verify_checksum(source, payload.image.checksum, ctx, (3, 10))
        driver = _TARGETS[payload.target.format][0]
        cmd = ["qemu-img", "convert", "-p", "-f", _QEMU_SOURCE[src_format], "-O", driver]
        cmd += ["-c"] if payload.compress else []
        self._run_convert(ctx, cmd, source, dest)
        if payload.verify:
            ctx.report_progress("verify", 96, "comparing source and target")
            self._compare(ctx, source, src_format, dest, driver)
        ctx.report_progress("complete", 100, f"wrote {dest.name}")
        data = {"source": str(source), "source_format": src_format, "output": str(dest),
                "target_format": payload.target.format, "compressed": payload.compress,
                "size_bytes": dest.stat().st_size, "verified": payload.verify,
                "duration_seconds": round(time.monotonic() - started, 3)}
        return HandlerResult(data=data, output_file=str(dest))

    def _check_chain(self, source: Path, dest: Path) -> tuple[str, int | None]:
        """Probe the source chain (roots, corruption); refuse a target that is one of its files.

        Returns the source format and virtual size (None when the header does not say).
        """
        chain = open_chain(source, image_roots(self.settings))
        try:
            for item in chain:
                if item.path == dest or (dest.exists() and os.path.samefile(item.path, dest)):
                    raise HandlerError(f"payload.data.target: '{dest}' is the source image or "
                                       f"one of its backing files; it is never overwritten")
            fmt, size = chain[0].probe.format, chain[0].probe.virtual_size
        finally:
            for item in chain:
                item.fh.close()
        if fmt not in _QEMU_SOURCE:
            raise HandlerError(f"image '{source}' has format {fmt}, which cannot be converted")
        return fmt, size

    def _run_convert(self, ctx: Context, cmd: list[str], source: Path, dest: Path) -> None:
        """Run qemu-img into a temporary file beside `dest`, then rename it into place."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.partial")
        tmp.unlink(missing_ok=True)
        ctx.report_progress("convert", 10, f"qemu-img convert to {dest.name}")
        try:
            rc, err = self._qemu_img(ctx, [*cmd, str(source), str(tmp)])
            if rc != 0:
                raise HandlerError(f"qemu-img convert of '{source}' failed ({_exit_text(rc)}): "
                                   f"{err}")
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def _qemu_img(self, ctx: Context, argv: list[str]) -> tuple[int, str]:
        """Run qemu-img, turning its `-p` output into progress 10-95; return (rc, stderr tail)."""
        errfile = Path(ctx.workdir) / "qemu-img.stderr"
        with open(errfile, "w+b") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=err, preexec_fn=_die_with_parent, close_fds=True)
            try:
                self._pump_progress(ctx, proc)
                rc = proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            err.seek(0)
            tail = err.read()[-2000:].decode("utf-8", "replace").strip()
        return rc, tail or "no error output"

    def _pump_progress(self, ctx: Context, proc: subprocess.Popen[bytes]) -> None:
        """Read qemu-img's `(NN.NN/100%)` reports until it closes stdout."""
        assert proc.stdout is not None
        last_pct, last_time, buf = -1, 0.0, b""
        while chunk := os.read(proc.stdout.fileno(), 4096):
            buf = (buf + chunk)[-256:]
            found = _PROGRESS.findall(buf)
            if not found:
                continue
            pct = 10 + int(float(found[-1]) * 85 / 100)
            if pct != last_pct and (time.monotonic() - last_time >= 0.5 or pct >= 95):
                ctx.report_progress("convert", pct, f"qemu-img {float(found[-1]):.1f}%")
                last_pct, last_time = pct, time.monotonic()
        proc.stdout.close()

    def _compare(self, ctx: Context, source: Path, src_format: str, dest: Path,
                 driver: str) -> None:
        """Fail unless `qemu-img compare` finds the guest-visible contents identical."""
        argv = ["qemu-img", "compare", "-f", _QEMU_SOURCE[src_format], "-F", driver,
                str(source), str(dest)]
        rc, err = self._qemu_img(ctx, argv)
        if rc != 0:
            raise HandlerError(f"qemu-img compare found '{dest}' differs from '{source}' "
                               f"({_exit_text(rc)}): {err}")
