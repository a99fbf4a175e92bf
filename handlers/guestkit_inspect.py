"""`guestkit.inspect`: report what is inside a VM disk image, without booting or mounting it."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from handlers.base import Context, HandlerResult
from handlers.guestkit_base import GUESTKIT_CAPABILITIES, GuestImageHandler
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

__all__ = ["GUESTKIT_CAPABILITIES", "InspectHandler", "InspectOptions", "InspectPayload"]

_SHOW_ON_SUMMARY = 30


class InspectOptions(BaseModel):
    """`payload.data.options`: which sections to collect (all of them by default)."""

    model_config = ConfigDict(extra="ignore")
    deep_scan: bool = False
    include_packages: bool = True
    include_services: bool = True
    include_users: bool = True
    include_network: bool = True
    include_security: bool = True
    include_storage: bool = True
    include_databases: bool = False


class InspectPayload(BaseModel):
    """`payload.data` of guestkit.inspect.v1."""

    model_config = ConfigDict(extra="ignore")
    image: ImageSpec
    options: InspectOptions | None = None
    output: OutputSpec | None = None


def build_report(guest: GuestImage, facts: GuestFacts, opts: InspectOptions,
                 image: dict[str, Any]) -> dict[str, Any]:
    """The full inspection report for the sections `opts` asks for."""
    report: dict[str, Any] = {
        "version": "1.0", "image": image,
        "operating_system": facts.operating_system(guest.os_family()),
        "machine_id": facts.machine_id, "cloud_init": facts.cloud_init,
        "vm_tools": {"detected": facts.vm_tools},
        "kernels": {"count": len(facts.kernels), "installed": facts.kernels},
        "kernel_modules": {"count": len(facts.kernel_modules), "modules": facts.kernel_modules},
    }
    if opts.include_storage:
        report["partitions"] = guest.volumes()
        report["storage"] = _storage(facts)
    if opts.include_packages:
        pkgs = facts.packages
        report["packages"] = {"manager": pkgs["manager"], "count": len(pkgs["packages"]),
                              "packages": pkgs["packages"]}
    if opts.include_services:
        report["services"] = {"count": len(facts.enabled_services),
                              "enabled": facts.enabled_services, **facts.services}
    if opts.include_users:
        report["users"] = _users(facts)
    if opts.include_network:
        report["network"] = facts.network
    if opts.include_security:
        report["security"] = _security(facts)
    return report


def _storage(facts: GuestFacts) -> dict[str, Any]:
    """fstab entries and the mountpoint → device map (swap and pseudo filesystems left out)."""
    pseudo = {"swap", "proc", "sysfs", "tmpfs", "devpts", "devtmpfs", "none"}
    mounts = {e["mountpoint"]: e["device"] for e in facts.fstab
              if e["fstype"] not in pseudo and e["mountpoint"].startswith("/")}
    return {"fstab": facts.fstab, "mountpoints": mounts}


def _users(facts: GuestFacts) -> dict[str, Any]:
    """Accounts with login/system flags and counts."""
    accounts = facts.accounts
    return {"count": len(accounts), "login_count": sum(a["login"] for a in accounts),
            "system_count": sum(a["system"] for a in accounts), "accounts": accounts}


def _security(facts: GuestFacts) -> dict[str, Any]:
    """sshd settings, SELinux (only where used), AppArmor (where present) and firewalls."""
    sshd = facts.sshd
    ssh: dict[str, Any] = {"configured": sshd is not None}
    if sshd is not None:
        ssh.update(permit_root_login=sshd.get("permitrootlogin", "prohibit-password"),
                   password_authentication=sshd.get("passwordauthentication", "yes"),
                   permit_empty_passwords=sshd.get("permitemptypasswords", "no"),
                   x11_forwarding=sshd.get("x11forwarding", "no"),
                   explicit_settings=sorted(sshd))
    section: dict[str, Any] = {"ssh": ssh, "firewall": facts.firewall}
    if facts.selinux is not None:
        section["selinux"] = facts.selinux
    if facts.apparmor is not None:
        section["apparmor"] = facts.apparmor
    return section


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The report cut down for the result document (long lists become counts and samples)."""
    out = {k: v for k, v in report.items() if k not in ("packages", "services", "partitions")}
    if "packages" in report:
        names = [p["name"] for p in report["packages"]["packages"]]
        out["packages"] = {"manager": report["packages"]["manager"], "count": len(names),
                           "sample": names[:_SHOW_ON_SUMMARY]}
    if "services" in report:
        out["services"] = {"count": report["services"]["count"],
                           "sample": report["services"]["enabled"][:_SHOW_ON_SUMMARY]}
    if "partitions" in report:
        out["partitions"] = {"count": len(report["partitions"]),
                             "filesystems": sorted({p["filesystem"] for p in report["partitions"]
                                                    if p["filesystem"]})}
    if "users" in report:
        out["users"] = {k: v for k, v in report["users"].items() if k != "accounts"}
        out["users"]["login_accounts"] = [a["name"] for a in report["users"]["accounts"]
                                          if a["login"]]
    return out


class InspectHandler(GuestImageHandler):
    """Inspects a disk image read-only: OS, packages, services, users, network, security."""

    name = "guestkit-inspect"
    operations = ("guestkit.inspect",)
    payload_types = ("guestkit.inspect.v1",)
    payload_model = InspectPayload

    def execute(self, ctx: Context, payload: Any) -> HandlerResult:
        """Open the image read-only once, build the report, write it, return its summary."""
        payload = payload if isinstance(payload, InspectPayload) else self.validate(payload)
        started = time.monotonic()
        ctx.report_progress("validation", 5, "checking the image path")
        guest, image = open_guest(ctx, payload.image, self.settings, (5, 20))
        with guest:
            ctx.report_progress("inspection", 40, f"reading the {guest.os_family()} guest")
            facts = guest_facts(guest)
            report = build_report(guest, facts, payload.options or InspectOptions(), image)
            report["warnings"] = guest.warnings + facts.warnings
            report = guest_text(report)
        ctx.report_progress("analysis", 80, "report built")
        report["inspected_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        report["inspection_time_seconds"] = round(time.monotonic() - started, 3)
        dest = choose_destination(payload.output, output_root(self.settings), ctx.output_dir,
                                  f"{ctx.job_id}-inspect", guest.path)
        ctx.report_progress("export", 90, f"writing {dest.name}")
        write_report(dest, report, payload.output)
        ctx.report_progress("complete", 100, "inspection complete")
        data = {"status": "success", "output_file": str(dest),
                "summary": {"image": str(guest.path), "format": image["format"],
                            "inspection_time": report["inspection_time_seconds"]},
                "inspect": summarize(report)}
        return HandlerResult(data=data, output_file=str(dest))
