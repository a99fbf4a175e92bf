"""`guestkit.profile`: security, compliance and hardening findings for a VM disk image."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from handlers.base import Context, HandlerResult
from handlers.guestkit_base import GuestImageHandler
from handlers.guestkit_checks import CHECKS, SEVERITIES, FileScan, run_profile, scan_files
from handlers.guestkit_facts import GuestFacts
from handlers.guestkit_image import (
    GuestImage,
    ImageSpec,
    OutputSpec,
    guest_facts,
    open_guest,
    output_root,
)
from handlers.guestkit_output import choose_destination, write_report
from handlers.guestkit_parsers import guest_text
from worker.errors import HandlerError

__all__ = ["ProfileHandler", "ProfileOptions", "ProfilePayload"]


class ProfileOptions(BaseModel):
    """`payload.data.options`: which findings to report and whether criticals fail the job."""

    model_config = ConfigDict(extra="ignore")
    severity_threshold: str = "info"
    fail_on_critical: bool = False
    include_remediation: bool = True

    @field_validator("severity_threshold")
    @classmethod
    def _known_severity(cls, value: str) -> str:
        """One of info, low, medium, high, critical (lower-cased)."""
        if value.lower() not in SEVERITIES:
            raise ValueError(f"unknown severity {value!r}; use one of {list(SEVERITIES)}")
        return value.lower()


class ProfilePayload(BaseModel):
    """`payload.data` of guestkit.profile.v1."""

    model_config = ConfigDict(extra="ignore")
    image: ImageSpec
    profiles: list[str]
    options: ProfileOptions | None = None
    output: OutputSpec | None = None

    @field_validator("profiles")
    @classmethod
    def _known_profiles(cls, value: list[str]) -> list[str]:
        """A non-empty list of security/compliance/hardening, duplicates dropped."""
        if not value:
            raise ValueError(f"must name at least one profile of {sorted(CHECKS)}")
        for i, name in enumerate(value):
            if name.lower() not in CHECKS:
                raise ValueError(f"profiles[{i}] {name!r} is not supported; use {sorted(CHECKS)}")
        return list(dict.fromkeys(n.lower() for n in value))


def _rank(severity: str) -> int:
    """Position of a severity from info (0) to critical (4)."""
    return SEVERITIES.index(severity)


def _summary(kept: list[dict[str, Any]], dropped: int, threshold: str) -> dict[str, Any]:
    """Counts by severity and by profile of the reported findings."""
    by_severity = {s: 0 for s in reversed(SEVERITIES)}
    by_profile: dict[str, int] = {}
    for f in kept:
        by_severity[f["severity"]] += 1
        by_profile[f["profile"]] = by_profile.get(f["profile"], 0) + 1
    return {"total_findings": len(kept), "by_severity": by_severity, "by_profile": by_profile,
            "severity_threshold": threshold, "below_threshold": dropped}


class ProfileHandler(GuestImageHandler):
    """Runs the requested profiles' checks over one read-only opening of the image."""

    name = "guestkit-profile"
    operations = ("guestkit.profile",)
    payload_types = ("guestkit.profile.v1",)
    payload_model = ProfilePayload

    def execute(self, ctx: Context, payload: Any) -> HandlerResult:
        """Run every requested profile over one opening of the image; write the report."""
        payload = payload if isinstance(payload, ProfilePayload) else self.validate(payload)
        opts = payload.options or ProfileOptions()
        ctx.report_progress("validation", 5, "checking the image path")
        guest, image = open_guest(ctx, payload.image, self.settings, (5, 20))
        with guest:
            facts = guest_facts(guest)
            findings, scan = self._run_checks(ctx, payload.profiles, guest, facts)
            os_section = facts.operating_system(guest.os_family())
            warnings = guest.warnings + facts.warnings
        report = guest_text(self._report(payload, opts, image, os_section, findings, warnings))
        report["files_scanned"] = scan.scanned if scan else None
        dest = choose_destination(payload.output, output_root(self.settings), ctx.output_dir,
                                  f"{ctx.job_id}-profile", guest.path)
        ctx.report_progress("export", 90, f"writing {dest.name}")
        write_report(dest, report, payload.output)
        self._fail_on_critical(opts, report["findings"], dest)
        ctx.report_progress("complete", 100, f"{report['summary']['total_findings']} finding(s)")
        return HandlerResult(data={**report, "output_file": str(dest)}, output_file=str(dest))

    def _run_checks(self, ctx: Context, profiles: list[str], guest: GuestImage,
                    facts: GuestFacts) -> tuple[list[dict[str, Any]], FileScan | None]:
        """Every finding of the requested profiles (Linux guests only) and the file scan."""
        if guest.os_family() != "linux":
            guest.warnings.append(f"the profile checks cover Linux guests; this guest is "
                                  f"{guest.os_family()}, so none ran")
            return [], None
        scan = None
        if "hardening" in profiles:
            ctx.report_progress("scan", 30, "walking the filesystems")
            scan = scan_files(guest.walk_posix)
        findings: list[dict[str, Any]] = []
        for i, profile in enumerate(profiles):
            ctx.report_progress(profile, 40 + 40 * i // len(profiles),
                                f"running the {profile} checks")
            findings += run_profile(profile, facts, scan)
        return findings, scan

    def _report(self, payload: ProfilePayload, opts: ProfileOptions, image: dict[str, Any],
                os_section: dict[str, Any], findings: list[dict[str, Any]],
                warnings: list[str]) -> dict[str, Any]:
        """The report: findings at or above the threshold, most severe first, and a summary."""
        floor = _rank(opts.severity_threshold)
        kept = [f for f in findings if _rank(f["severity"]) >= floor]
        kept.sort(key=lambda f: (-_rank(f["severity"]), f["id"]))
        if not opts.include_remediation or (payload.output and not payload.output.include_remediation):
            for f in kept:
                f.pop("remediation", None)
        return {"version": "1.0", "image": image, "operating_system": os_section,
                "profiles": payload.profiles, "options": opts.model_dump(),
                "summary": _summary(kept, len(findings) - len(kept), opts.severity_threshold),
                "findings": kept, "warnings": warnings,
                "timestamp": datetime.now(UTC).isoformat(timespec="seconds")}

    def _fail_on_critical(self, opts: ProfileOptions, findings: list[dict[str, Any]],
                          dest: Path) -> None:
        """With fail_on_critical, fail the job naming each critical finding (report kept)."""
        critical = [f for f in findings if f["severity"] == "critical"]
        if opts.fail_on_critical and critical:
            names = "; ".join(f"{f['id']} {f['title']} ({', '.join(f['affected'][:10])})"
                              for f in critical)
            raise HandlerError(f"{len(critical)} critical finding(s) and fail_on_critical is set: "
                               f"{names}. The report was written to '{dest}'")
