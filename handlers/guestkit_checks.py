"""The security, compliance and hardening checks of guestkit.profile, over guest facts.

Each check returns at most one finding (with every affected item listed), so a report
reads as a list of problems rather than a list of files. Ids follow the original
worker's CIS-style scheme; `references` name the CIS control each one maps to.
"""

from __future__ import annotations

import fnmatch
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from handlers.guestkit_facts import GuestFacts, unit_stem
from handlers.guestkit_parsers import guest_int

__all__ = ["CHECKS", "SEVERITIES", "FileScan", "run_profile", "scan_files"]

SEVERITIES = ("info", "low", "medium", "high", "critical")
_AFFECTED_LIMIT = 200
_CIS = "CIS Distribution Independent Linux Benchmark"

#: SUID/SGID programs a stock Debian, Ubuntu, RHEL or SUSE install ships (paths without /usr).
_SPECIAL_ALLOWED = (
    "/bin/passwd", "/bin/su", "/bin/sudo", "/bin/sudoedit", "/bin/mount", "/bin/umount",
    "/bin/chsh", "/bin/chfn", "/bin/gpasswd", "/bin/newgrp", "/bin/pkexec", "/bin/crontab",
    "/bin/at", "/bin/fusermount", "/bin/fusermount3", "/bin/ssh-agent", "/bin/chage",
    "/bin/expiry", "/bin/wall", "/bin/write", "/bin/bsd-write", "/bin/dotlockfile",
    "/bin/newuidmap", "/bin/newgidmap", "/bin/ping", "/bin/mlocate", "/bin/locate",
    "/bin/plocate", "/bin/staprun", "/bin/screen", "/bin/Xorg", "/bin/ntfs-3g",
    "/sbin/unix_chkpwd", "/sbin/pam_timestamp_check", "/sbin/userhelper", "/sbin/mount.nfs",
    "/sbin/usernetctl", "/sbin/grub2-set-bootflag", "/sbin/postdrop", "/sbin/postqueue",
    "/sbin/exim4", "/sbin/pppd", "/sbin/mount.cifs", "/sbin/netreport",
    "/lib/openssh/ssh-keysign", "/libexec/openssh/ssh-keysign",
    "/lib/dbus-1.0/dbus-daemon-launch-helper", "/libexec/dbus-1/dbus-daemon-launch-helper",
    "/lib/policykit-1/polkit-agent-helper-1", "/lib/polkit-1/polkit-agent-helper-1",
    "/libexec/polkit-agent-helper-1", "/lib/eject/dmcrypt-get-device",
    "/lib/*/utempter/utempter", "/libexec/utempter/utempter", "/lib/snapd/snap-confine",
    "/lib/xorg/Xorg.wrap", "/libexec/Xorg.wrap", "/libexec/cockpit-session",
    "/lib/chromium/chrome-sandbox", "/libexec/qemu-bridge-helper", "/lib/qemu/qemu-bridge-helper",
    "/libexec/spice-gtk-*/spice-client-glib-usb-acl-helper", "/lib/sssd/*", "/libexec/sssd/*",
)
#: Plaintext remote-access and file-transfer services CIS says to disable.
_LEGACY = {"telnet": "Telnet", "telnetd": "Telnet", "rsh": "rsh", "rshd": "rsh",
           "rlogin": "rlogin", "rlogind": "rlogin", "rexec": "rexec", "rexecd": "rexec",
           "tftp": "TFTP", "tftpd": "TFTP", "tftpd-hpa": "TFTP", "atftpd": "TFTP",
           "talk": "talk", "ntalk": "talk", "talkd": "talk", "ypserv": "NIS",
           "ypbind": "NIS", "vsftpd": "FTP", "proftpd": "FTP", "pure-ftpd": "FTP"}


@dataclass
class FileScan:
    """What one walk of the guest's POSIX filesystems found."""

    world_writable_files: list[str] = field(default_factory=list)
    world_writable_dirs: list[str] = field(default_factory=list)
    special: list[tuple[str, str]] = field(default_factory=list)
    scanned: int = 0


def scan_files(walk: Callable[[Callable[[str, int], None]], int]) -> FileScan:
    """Walk the filesystems once, keeping world-writable entries and SUID/SGID files."""
    scan = FileScan()

    def visit(path: str, mode: int) -> None:
        """Keep one walked entry if it is world-writable or SUID/SGID."""
        if stat.S_ISREG(mode):
            if mode & stat.S_IWOTH:
                scan.world_writable_files.append(path)
            bits = [n for n, b in (("setuid", stat.S_ISUID), ("setgid", stat.S_ISGID)) if mode & b]
            if bits:
                scan.special.append((path, "+".join(bits)))
        elif stat.S_ISDIR(mode) and mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            scan.world_writable_dirs.append(path)

    scan.scanned = walk(visit)
    return scan


def _finding(fid: str, severity: str, title: str, description: str, remediation: str,
             references: list[str], affected: list[str] | None = None) -> dict[str, Any]:
    """One finding; `affected` is capped, with the full count kept."""
    items = sorted(affected or [])
    return {"id": fid, "severity": severity, "title": title, "description": description,
            "remediation": remediation, "references": references,
            "affected": items[:_AFFECTED_LIMIT], "affected_count": len(items)}


# ---------------------------------------------------------------- security

def _ssh_root_login(f: GuestFacts, _: FileScan | None) -> list[dict[str, Any]]:
    """CIS-SSH-001 when sshd_config sets PermitRootLogin yes."""
    if f.sshd is None or f.sshd.get("permitrootlogin", "prohibit-password").lower() != "yes":
        return []
    return [_finding("CIS-SSH-001", "high", "SSH root login enabled",
                     "sshd_config sets PermitRootLogin yes: root can log in over SSH with a password.",
                     "Set 'PermitRootLogin no' (or 'prohibit-password') in /etc/ssh/sshd_config.",
                     [f"{_CIS}: Ensure SSH root login is disabled"], ["/etc/ssh/sshd_config"])]


def _ssh_password_auth(f: GuestFacts, _: FileScan | None) -> list[dict[str, Any]]:
    """CIS-SSH-002 when sshd accepts passwords (set, or left at the default yes)."""
    if f.sshd is None or f.sshd.get("passwordauthentication", "yes").lower() != "yes":
        return []
    how = "sets" if "passwordauthentication" in f.sshd else "leaves OpenSSH's default of"
    return [_finding("CIS-SSH-002", "medium", "SSH password authentication enabled",
                     f"sshd_config {how} PasswordAuthentication yes, so SSH accepts passwords "
                     "and is open to guessing.",
                     "Set 'PasswordAuthentication no' and use keys.",
                     [f"{_CIS}: Ensure SSH PasswordAuthentication is disabled"],
                     ["/etc/ssh/sshd_config"])]


def _ssh_empty_passwords(f: GuestFacts, _: FileScan | None) -> list[dict[str, Any]]:
    """CIS-SSH-003 when sshd_config sets PermitEmptyPasswords yes."""
    if f.sshd is None or f.sshd.get("permitemptypasswords", "no").lower() != "yes":
        return []
    return [_finding("CIS-SSH-003", "high", "SSH permits empty passwords",
                     "sshd_config sets PermitEmptyPasswords yes.",
                     "Set 'PermitEmptyPasswords no' in /etc/ssh/sshd_config.",
                     [f"{_CIS}: Ensure SSH PermitEmptyPasswords is disabled"],
                     ["/etc/ssh/sshd_config"])]


def _empty_passwords(f: GuestFacts, _: FileScan | None) -> list[dict[str, Any]]:
    """CIS-AUTH-001 for accounts with an empty password field in /etc/shadow or /etc/passwd."""
    names = sorted({n for n, h in f.shadow.items() if h == ""}
                   | {a["name"] for a in f.accounts if a["password"] == "empty"})
    if not names:
        return []
    return [_finding("CIS-AUTH-001", "critical", "Accounts with an empty password",
                     f"/etc/shadow or /etc/passwd has an empty password field for: "
                     f"{', '.join(names)}. "
                     "Anyone can log in as these accounts without a password.",
                     "Lock the accounts (passwd -l NAME) or set a strong password.",
                     [f"{_CIS}: Ensure password fields are not empty"], names)]


def _extra_uid0(f: GuestFacts, _: FileScan | None) -> list[dict[str, Any]]:
    """CIS-AUTH-002 for accounts other than root with UID 0."""
    names = [a["name"] for a in f.accounts if a["uid"] == 0 and a["name"] != "root"]
    if not names:
        return []
    return [_finding("CIS-AUTH-002", "critical", "Accounts other than root have UID 0",
                     f"These accounts have full root privileges: {', '.join(names)}.",
                     "Give each account its own UID, or remove it.",
                     [f"{_CIS}: Ensure root is the only UID 0 account"], names)]


def _firewall(f: GuestFacts, _: FileScan | None) -> list[dict[str, Any]]:
    """CIS-FW-001 when no host firewall is enabled at boot."""
    if f.firewall["any_enabled"]:
        return []
    present = [k for k, v in f.firewall.items() if isinstance(v, dict) and v["present"]]
    detail = (f"configured but not enabled: {', '.join(present)}" if present else
              "no ufw, firewalld, nftables or iptables configuration was found")
    return [_finding("CIS-FW-001", "medium", "No host firewall enabled",
                     f"No firewall starts at boot ({detail}).",
                     "Install and enable a host firewall (nftables, firewalld or ufw) with a "
                     "default-deny inbound policy.",
                     [f"{_CIS}: Ensure a single firewall configuration utility is in use"],
                     present)]


# ---------------------------------------------------------------- compliance

def _login_defs_int(f: GuestFacts, key: str) -> int | None:
    """An integer setting of /etc/login.defs, or None when unset or not a number."""
    value = f.login_defs.get(key, "")
    number = guest_int(value.removeprefix("-"))
    return None if number is None else -number if value.startswith("-") else number


def _password_max_age(f: GuestFacts, _: FileScan | None) -> list[dict[str, Any]]:
    """CIS-PWD-001 when PASS_MAX_DAYS is unset, 0 or over 365."""
    days = _login_defs_int(f, "PASS_MAX_DAYS")
    if days is not None and 0 < days <= 365:
        return []
    shown = "not set" if days is None else str(days)
    return [_finding("CIS-PWD-001", "medium", "Password expiration is too long",
                     f"PASS_MAX_DAYS in /etc/login.defs is {shown}; passwords never have to change.",
                     "Set PASS_MAX_DAYS to 365 or less in /etc/login.defs (and chage existing users).",
                     [f"{_CIS}: Ensure password expiration is 365 days or less"],
                     ["/etc/login.defs"])]


def _password_min_age(f: GuestFacts, _: FileScan | None) -> list[dict[str, Any]]:
    """CIS-PWD-002 when PASS_MIN_DAYS is unset or below 1."""
    days = _login_defs_int(f, "PASS_MIN_DAYS")
    if days is not None and days >= 1:
        return []
    return [_finding("CIS-PWD-002", "low", "Minimum days between password changes is not set",
                     f"PASS_MIN_DAYS in /etc/login.defs is {days if days is not None else 'not set'}; "
                     "users can cycle straight back to an old password.",
                     "Set PASS_MIN_DAYS to 1 or more in /etc/login.defs.",
                     [f"{_CIS}: Ensure minimum days between password changes is configured"],
                     ["/etc/login.defs"])]


def _password_warn_age(f: GuestFacts, _: FileScan | None) -> list[dict[str, Any]]:
    """CIS-PWD-003 when PASS_WARN_AGE is unset or below 7."""
    days = _login_defs_int(f, "PASS_WARN_AGE")
    if days is not None and days >= 7:
        return []
    return [_finding("CIS-PWD-003", "low", "Password expiration warning is too short",
                     f"PASS_WARN_AGE in /etc/login.defs is {days if days is not None else 'not set'}.",
                     "Set PASS_WARN_AGE to 7 or more in /etc/login.defs.",
                     [f"{_CIS}: Ensure password expiration warning days is 7 or more"],
                     ["/etc/login.defs"])]


def _selinux(f: GuestFacts, _: FileScan | None) -> list[dict[str, Any]]:
    """CIS-MAC-001/002 when SELinux is disabled or permissive, only where it is used."""
    se = f.selinux
    if se is None or se["mode"] == "enforcing":
        return []
    refs = [f"{_CIS}: Ensure the SELinux mode is enforcing", "PCI-DSS 2.2.4"]
    if se["mode"] == "permissive":
        return [_finding("CIS-MAC-002", "medium", "SELinux is permissive",
                         "SELinux logs policy violations but does not block them.",
                         "Set SELINUX=enforcing in /etc/selinux/config and remove enforcing=0 "
                         "from the kernel command line.", refs, ["/etc/selinux/config"])]
    why = "" if se["configured"] else " (/etc/selinux/config is missing)"
    return [_finding("CIS-MAC-001", "high", "SELinux is disabled",
                     f"This distribution relies on SELinux, but it is disabled{why}.",
                     "Set SELINUX=enforcing in /etc/selinux/config, remove selinux=0 from the "
                     "kernel command line, and relabel (touch /.autorelabel).",
                     refs, ["/etc/selinux/config"])]


# ---------------------------------------------------------------- hardening

def _world_writable_files(_: GuestFacts, scan: FileScan | None) -> list[dict[str, Any]]:
    """CIS-FS-001 for regular files writable by others."""
    if not scan or not scan.world_writable_files:
        return []
    return [_finding("CIS-FS-001", "medium", "World-writable files",
                     f"{len(scan.world_writable_files)} regular file(s) can be modified by any user.",
                     "Remove the write bit for others (chmod o-w FILE) unless it is required.",
                     [f"{_CIS}: Ensure no world writable files exist"], scan.world_writable_files)]


def _world_writable_dirs(_: GuestFacts, scan: FileScan | None) -> list[dict[str, Any]]:
    """CIS-FS-002 for directories writable by others without the sticky bit."""
    if not scan or not scan.world_writable_dirs:
        return []
    return [_finding("CIS-FS-002", "medium", "World-writable directories without the sticky bit",
                     f"{len(scan.world_writable_dirs)} directory(ies) let any user delete or "
                     "replace other users' files.",
                     "Set the sticky bit (chmod +t DIR) or remove the write bit for others.",
                     [f"{_CIS}: Ensure sticky bit is set on all world-writable directories"],
                     scan.world_writable_dirs)]


def _special_allowed(path: str) -> bool:
    """Whether a SUID/SGID path is one a stock distribution ships."""
    bare = path.removeprefix("/usr") if path.startswith("/usr/") else path
    return any(fnmatch.fnmatchcase(bare, pattern) for pattern in _SPECIAL_ALLOWED)


def _unexpected_special(_: GuestFacts, scan: FileScan | None) -> list[dict[str, Any]]:
    """CIS-FS-003 for SUID/SGID files outside the stock allow-list."""
    odd = [f"{p} ({bits})" for p, bits in scan.special if not _special_allowed(p)] if scan else []
    if not odd:
        return []
    return [_finding("CIS-FS-003", "medium", "Unexpected SUID/SGID programs",
                     f"{len(odd)} program(s) run with their owner's or group's privileges and are "
                     "not among those a stock distribution ships.",
                     "Review each one; remove the bit (chmod u-s,g-s FILE) if it is not needed.",
                     [f"{_CIS}: Audit SUID executables", f"{_CIS}: Audit SGID executables"], odd)]


def _legacy_services(f: GuestFacts, _: FileScan | None) -> list[dict[str, Any]]:
    """CIS-SVC-001 for enabled telnet/rsh/rlogin/rexec/TFTP/talk/NIS/FTP services."""
    found = []
    for kind, names in f.services.items():
        for name in names:
            stem = unit_stem(name)
            if stem in _LEGACY:
                found.append(f"{name} ({_LEGACY[stem]}, {kind})")
    if not found:
        return []
    return [_finding("CIS-SVC-001", "high", "Legacy plaintext network services enabled",
                     "These services send credentials in clear text: " + ", ".join(found) + ".",
                     "Disable them (systemctl disable --now UNIT) and remove the packages; "
                     "use SSH/SFTP instead.",
                     [f"{_CIS}: Ensure telnet, rsh, talk, TFTP and NIS servers are not enabled"],
                     found)]


Check = Callable[[GuestFacts, FileScan | None], list[dict[str, Any]]]

#: The checks of each profile, in report order.
CHECKS: dict[str, tuple[Check, ...]] = {
    "security": (_ssh_root_login, _ssh_password_auth, _ssh_empty_passwords, _empty_passwords,
                 _extra_uid0, _firewall),
    "compliance": (_password_max_age, _password_min_age, _password_warn_age, _selinux),
    "hardening": (_world_writable_files, _world_writable_dirs, _unexpected_special,
                  _legacy_services),
}


def run_profile(profile: str, facts: GuestFacts, scan: FileScan | None) -> list[dict[str, Any]]:
    """Every finding of one profile, each tagged with the profile name."""
    out = []
    for check in CHECKS[profile]:
        for finding in check(facts, scan):
            out.append({"profile": profile, **finding})
    return out
