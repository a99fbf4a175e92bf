"""Facts about a Linux guest, read from where each distribution keeps them.

`GuestFacts` knows the file locations (os-release, passwd, dpkg status, the rpm
database, systemd links, sshd_config, ...) and computes each fact once on first use,
so inspect and profile read the same answers from one opened image. No binary from
the image is ever run: everything is parsed as data.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from functools import cached_property
from typing import Any, Protocol

from handlers import guestkit_parsers as p
from handlers.guestkit_rpmdb import RpmdbError, read_packages

__all__ = ["GuestFacts", "GuestFiles", "unit_stem"]

_NOLOGIN_SHELLS = ("nologin", "false", "sync", "halt", "shutdown")
_SELINUX_FAMILIES = frozenset({"rhel", "fedora", "centos", "rocky", "almalinux", "ol", "amzn",
                               "scientific", "eurolinux", "cloudlinux", "circle", "navy"})
_ARCH_NAMES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64",
               "i386": "i386", "i686": "i386", "armhf": "armv7l", "ppc64el": "ppc64le",
               "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
_RPMDB_PATHS = ("/var/lib/rpm/rpmdb.sqlite", "/usr/lib/sysimage/rpm/rpmdb.sqlite")
_UNIT_SUFFIXES = (".service", ".socket", ".timer", ".path")
#: Text read from configuration files per guest: a hostile guest can point many names at
#: one large (sparse) file; no real guest's configuration comes near it.
TEXT_BUDGET = 64 * 1024 * 1024
SSHD_INCLUDES = 256  #: files an sshd_config may include in all (each is read once)
MAX_ACCOUNTS = 100_000  #: /etc/passwd entries listed
_VM_TOOLS = {
    "qemu-guest-agent": ("/usr/bin/qemu-ga", "/usr/sbin/qemu-ga"),
    "open-vm-tools": ("/usr/bin/vmtoolsd",),
    "virtualbox-guest": ("/usr/sbin/VBoxService", "/usr/bin/VBoxClient"),
    "hyperv": ("/usr/sbin/hv_kvp_daemon", "/usr/libexec/hypervkvpd"),
    "xen-guest-agent": ("/usr/sbin/xe-daemon", "/usr/sbin/xe-linux-distribution"),
}


class GuestFiles(Protocol):
    """Read-only access to a guest's files (paths are absolute inside the guest)."""

    def read_text(self, guest_path: str) -> str | None:
        """Text of a file, or None when it is missing or unreadable."""

    def read_bytes(self, guest_path: str, limit: int = ...) -> bytes | None:
        """Bytes of a file, or None when it is missing, unreadable or over `limit`."""

    def exists(self, guest_path: str) -> bool:
        """Whether the path exists."""

    def listdir(self, guest_path: str) -> list[str]:
        """Sorted names in a directory; empty when missing."""


class GuestFacts:
    """Facts of one guest; each computed once, from files only."""

    def __init__(self, files: GuestFiles, hostname_hint: str | None = None,
                 arch_hint: str | None = None) -> None:
        """Facts over `files`; the hints are the image library's own guesses."""
        self.files = files
        self.hostname_hint = hostname_hint
        self.arch_hint = arch_hint
        self.warnings: list[str] = []
        self.text_left = TEXT_BUDGET
        self._sshd_included: set[str] = set()
        self._sshd_patterns = 0

    def text(self, path: str) -> str:
        """A guest file's text, '' when missing or once TEXT_BUDGET bytes were read."""
        if self.text_left <= 0:
            self.warn_once(f"configuration files past the first {TEXT_BUDGET} bytes were not read")
            return ""
        text = self.files.read_text(path) or ""
        self.text_left -= len(text.encode())
        return text

    def warn_once(self, warning: str) -> None:
        """Add `warning` to the report's warnings unless it is there already."""
        if warning not in self.warnings:
            self.warnings.append(warning)

    def glob_path(self, pattern: str, limit: int = 4096) -> list[str]:
        """Sorted guest paths matching absolute `pattern` as glob(3) does; `limit` per level."""
        found = [""]
        for part in (c for c in pattern.split("/") if c):
            if not any(ch in part for ch in "*?["):
                found = [f"{base}/{part}" for base in found]
                continue
            hidden = part.startswith(".")  # like glob(3): only a pattern's "." matches one
            found = list(itertools.islice(
                (f"{base}/{n}" for base in found[:limit] for n in self.files.listdir(base or "/")
                 if (hidden or not n.startswith(".")) and fnmatch.fnmatch(n, part)), limit))
        return sorted(found)

    def glob(self, directory: str, pattern: str) -> list[str]:
        """Sorted guest paths in `directory` whose names match `pattern` (not hidden ones)."""
        return self.glob_path(f"{directory}/{pattern}")

    # ---------------------------------------------------------------- identity

    @cached_property
    def os_release(self) -> dict[str, str]:
        """/etc/os-release (or /usr/lib/os-release) as a dict."""
        return p.parse_env(self.text("/etc/os-release") or self.text("/usr/lib/os-release"))

    @cached_property
    def families(self) -> set[str]:
        """The distribution ID and every ID_LIKE, lower-case."""
        ids = f"{self.os_release.get('ID', '')} {self.os_release.get('ID_LIKE', '')}"
        return {i.lower() for i in ids.split() if i}

    @cached_property
    def hostname(self) -> str | None:
        """/etc/hostname, else HOSTNAME= of /etc/sysconfig/network, else the library's guess."""
        name = self.text("/etc/hostname").strip().splitlines()
        if name and name[0].strip():
            return name[0].strip()
        legacy = p.parse_env(self.text("/etc/sysconfig/network")).get("HOSTNAME")
        return legacy or self.hostname_hint

    @cached_property
    def login_defs(self) -> dict[str, str]:
        """/etc/login.defs settings."""
        return p.parse_login_defs(self.text("/etc/login.defs"))

    def operating_system(self, family: str) -> dict[str, Any]:
        """The OS section: type, distribution, product name, version, hostname, arch, ..."""
        osr = self.os_release
        version = osr.get("VERSION_ID", "")
        debian = self.text("/etc/debian_version").strip()
        if version and debian.startswith(version + "."):
            version = debian
        major, _, minor = version.partition(".")
        return {
            "type": family,
            "distribution": osr.get("ID", "").lower() or None,
            "product_name": osr.get("PRETTY_NAME") or osr.get("NAME") or None,
            "version": version or None,
            "major_version": p.guest_int(major),
            "minor_version": p.guest_int(minor.split(".")[0]),
            "hostname": self.hostname,
            "arch": self.architecture,
            "package_format": self.packages["manager"],
            "id_like": sorted(self.families - {osr.get("ID", "").lower()}),
        }

    @cached_property
    def architecture(self) -> str | None:
        """The CPU architecture: the library's reading of an ELF file, else package metadata."""
        if self.arch_hint:
            return _ARCH_NAMES.get(self.arch_hint.split("-")[0], self.arch_hint.split("-")[0])
        seen = [pkg.get("arch", "") for pkg in self.packages["packages"]]
        for arch in sorted(set(seen), key=seen.count, reverse=True):
            if arch in _ARCH_NAMES:
                return _ARCH_NAMES[arch]
        for kernel in self.kernels:
            for suffix, arch in _ARCH_NAMES.items():
                if kernel.endswith(("-" + suffix, "." + suffix)):
                    return arch
        return None

    # ---------------------------------------------------------------- packages

    @cached_property
    def packages(self) -> dict[str, Any]:
        """{manager, packages: [{name, version, arch}]} from dpkg, rpm (sqlite) or apk."""
        if self.files.exists("/var/lib/dpkg/status"):
            return {"manager": "deb",
                    "packages": p.parse_dpkg_status(self.text("/var/lib/dpkg/status"))}
        for path in _RPMDB_PATHS:
            if self.files.exists(path):
                return {"manager": "rpm", "packages": self._rpm_packages(path)}
        if self.files.exists("/var/lib/rpm/Packages"):
            self.warnings.append("the rpm database is BerkeleyDB (/var/lib/rpm/Packages), which "
                                 "is not supported; packages are not listed")
            return {"manager": "rpm", "packages": []}
        if self.files.exists("/lib/apk/db/installed"):
            return {"manager": "apk",
                    "packages": p.parse_apk_installed(self.text("/lib/apk/db/installed"))}
        manager = "pacman" if self.files.exists("/var/lib/pacman/local") else "unknown"
        return {"manager": manager, "packages": []}

    def _rpm_packages(self, path: str) -> list[dict[str, Any]]:
        """Packages of an sqlite rpmdb, versions as [epoch:]version-release."""
        data = self.files.read_bytes(path, 512 * 1024 * 1024)
        try:
            headers = read_packages(data or b"")
        except RpmdbError as exc:
            self.warnings.append(f"cannot read the rpm database {path}: {exc}")
            return []
        if (self.files.read_bytes(path + "-wal", 1) or b""):
            self.warnings.append(f"{path}-wal holds changes not merged into the database; "
                                 "the package list may be stale")
        out = []
        for h in headers:
            epoch = f"{h['epoch']}:" if h.get("epoch") else ""
            out.append({"name": h["name"], "arch": h.get("arch", ""),
                        "version": f"{epoch}{h.get('version', '')}-{h.get('release', '')}"})
        return out

    def has_package(self, *names: str) -> bool:
        """Whether any of the named packages is installed."""
        return any(pkg["name"] in names for pkg in self.packages["packages"])

    @cached_property
    def kernels(self) -> list[str]:
        """Installed kernel versions, from /boot and the modules directories."""
        found = {n.split("-", 1)[1] for n in self.files.listdir("/boot")
                 if n.startswith(("vmlinuz-", "vmlinux-")) and "rescue" not in n}
        for base in ("/lib/modules", "/usr/lib/modules"):
            found.update(self.files.listdir(base))
        return sorted({p.guest_name(n) for n in found})

    # ---------------------------------------------------------------- accounts

    @cached_property
    def shadow(self) -> dict[str, str]:
        """Account → password field, read straight from /etc/shadow."""
        return p.parse_shadow(self.text("/etc/shadow"))

    @cached_property
    def accounts(self) -> list[dict[str, Any]]:
        """/etc/passwd accounts with login/system/admin flags and password state."""
        uid_min = p.guest_int(self.login_defs.get("UID_MIN", ""))
        uid_min = 1000 if uid_min is None else uid_min
        groups = p.parse_group(self.text("/etc/group"))
        admins = {m for g in ("sudo", "wheel", "admin") for m in groups.get(g, [])}
        out = []
        accounts = p.parse_passwd(self.text("/etc/passwd"), MAX_ACCOUNTS + 1)
        if len(accounts) > MAX_ACCOUNTS:
            self.warnings.append(f"/etc/passwd lists more than {MAX_ACCOUNTS} accounts; "
                                 f"the first {MAX_ACCOUNTS} are reported")
            del accounts[MAX_ACCOUNTS:]
        for acct in accounts:
            shell = acct["shell"]
            acct["login"] = bool(shell) and not shell.rsplit("/", 1)[-1].startswith(_NOLOGIN_SHELLS)
            acct["system"] = acct["uid"] < uid_min or acct["uid"] == 65534
            acct["admin"] = acct["uid"] == 0 or acct["name"] in admins
            acct["password"] = "empty" if acct.pop("no_password") else \
                _password_state(self.shadow.get(acct["name"]))
            out.append(acct)
        return out

    # ---------------------------------------------------------------- services

    @cached_property
    def masked_units(self) -> set[str]:
        """Units masked in /etc/systemd/system (linked to /dev/null)."""
        return {n for n in self.files.listdir("/etc/systemd/system") if n.endswith(_UNIT_SUFFIXES)
                and not self.files.exists(f"/etc/systemd/system/{n}")}

    @cached_property
    def services(self) -> dict[str, list[str]]:
        """Enabled units by mechanism: systemd (.wants/.requires links), sysv, inetd, xinetd."""
        units: set[str] = set()
        for d in self.files.listdir("/etc/systemd/system"):
            if d.endswith((".wants", ".requires")):
                units.update(n for n in self.files.listdir(f"/etc/systemd/system/{d}")
                             if n.endswith(_UNIT_SUFFIXES))
        sysv = {re.sub(r"^S\d+", "", n) for lvl in (2, 3, 5)
                for n in self.files.listdir(f"/etc/rc{lvl}.d") if re.match(r"S\d+", n)}
        xinetd = [name for f in [*self.glob("/etc/xinetd.d", "*"), "/etc/xinetd.conf"]
                  for name, on in p.parse_xinetd(self.text(f)) if on]
        found = {"systemd": units - self.masked_units, "sysv": sysv,
                 "inetd": set(p.parse_inetd(self.text("/etc/inetd.conf"))), "xinetd": set(xinetd)}
        return {kind: sorted({p.guest_name(n) for n in names}) for kind, names in found.items()}

    @cached_property
    def enabled_services(self) -> list[str]:
        """Every enabled service name, each mechanism's names together."""
        return sorted({n for names in self.services.values() for n in names})

    def unit_enabled(self, *stems: str) -> bool:
        """Whether a systemd unit or sysv script with one of these base names is enabled."""
        return any(unit_stem(n) in stems for n in self.enabled_services)

    # ---------------------------------------------------------------- security

    @cached_property
    def sshd(self) -> dict[str, str] | None:
        """Effective global sshd_config options (Include followed), None without sshd_config."""
        main = self.files.read_text("/etc/ssh/sshd_config")
        if main is None:
            return None
        self._sshd_included.add("/etc/ssh/sshd_config")
        return p.parse_sshd_config(main, self._sshd_include)

    def _sshd_include(self, pattern: str) -> list[str]:
        """Texts of the files an `Include` names not read yet (a repeat sets nothing: first wins)."""
        self._sshd_patterns += 1
        if len(self._sshd_included) >= SSHD_INCLUDES or self._sshd_patterns > 4 * SSHD_INCLUDES:
            self.warn_once(f"sshd_config includes more than {SSHD_INCLUDES} files or "
                           f"{4 * SSHD_INCLUDES} patterns; the rest were not read")
            return []
        pattern = pattern if pattern.startswith("/") else f"/etc/ssh/{pattern}"
        texts = []
        for path in self.glob_path(pattern, SSHD_INCLUDES):
            if path not in self._sshd_included and len(self._sshd_included) < SSHD_INCLUDES:
                self._sshd_included.add(path)
                texts.append(self.text(path))
        return texts

    @cached_property
    def kernel_cmdline(self) -> str:
        """The kernel's options from grub's defaults, /etc/kernel/cmdline, BLS entries, grubenv."""
        lines = [ln for ln in self.text("/etc/default/grub").splitlines()
                 if ln.lstrip().startswith("GRUB_CMDLINE_LINUX")]  # not its comments
        lines += self.text("/etc/kernel/cmdline").splitlines()[:1]
        for path in [*self.glob("/boot/loader/entries", "*.conf"), "/boot/grub2/grubenv"]:
            lines += [ln for ln in self.text(path).splitlines()
                      if ln.lstrip().startswith(("options", "kernelopts="))]
        return "\n".join(lines)

    @cached_property
    def selinux(self) -> dict[str, Any] | None:
        """SELinux mode and policy where the distribution uses SELinux, else None."""
        config = self.files.read_text("/etc/selinux/config")
        if config is None and not self.families & _SELINUX_FAMILIES:
            return None
        env = p.parse_env(config or "")
        mode = env.get("SELINUX", "disabled").lower() if config is not None else "disabled"
        if re.search(r"\bselinux=0\b", self.kernel_cmdline):
            mode = "disabled"
        elif mode == "enforcing" and re.search(r"\benforcing=0\b", self.kernel_cmdline):
            mode = "permissive"
        return {"mode": mode, "policy": env.get("SELINUXTYPE"), "enabled": mode != "disabled",
                "configured": config is not None}

    @cached_property
    def apparmor(self) -> dict[str, Any] | None:
        """AppArmor profiles present and service state, None where AppArmor is absent."""
        if not self.files.exists("/etc/apparmor.d"):
            return None
        profiles = [n for n in self.files.listdir("/etc/apparmor.d") if "." in n or n.startswith("usr")]
        return {"profiles": len(profiles), "enabled": self.unit_enabled("apparmor")}

    @cached_property
    def firewall(self) -> dict[str, Any]:
        """Each firewall found (ufw, firewalld, nftables, iptables): present and enabled."""
        ufw = p.parse_env(self.text("/etc/ufw/ufw.conf"))
        found = {
            "ufw": (bool(ufw), ufw.get("ENABLED", "").lower() == "yes" and self._ufw_starts),
            "firewalld": (self.files.exists("/etc/firewalld"), self.unit_enabled("firewalld")),
            "nftables": (self.files.exists("/etc/nftables.conf")
                         or self.files.exists("/etc/sysconfig/nftables.conf"),
                         self.unit_enabled("nftables")),
            "iptables": (self.files.exists("/etc/iptables/rules.v4")
                         or self.files.exists("/etc/sysconfig/iptables"),
                         self.unit_enabled("iptables", "netfilter-persistent")),
        }
        out: dict[str, Any] = {k: {"present": pr, "enabled": pr and en}
                               for k, (pr, en) in found.items()}
        out["any_enabled"] = any(v["enabled"] for v in out.values())
        return out

    @property
    def _ufw_starts(self) -> bool:
        """ufw.conf's ENABLED= takes effect only through its boot service (systemd or rcS.d),
        not once masked (systemd then ignores the rcS.d link too)."""
        if "ufw.service" in self.masked_units:
            return False
        return self.unit_enabled("ufw") or any(
            re.fullmatch(r"S\d+ufw", n) for n in self.files.listdir("/etc/rcS.d"))

    # ---------------------------------------------------------------- network and storage

    @cached_property
    def network(self) -> dict[str, Any]:
        """Configured interfaces, gateways and DNS servers from every config style we know."""
        ifaces, dns = self._interfaces()
        servers, search = p.parse_resolv_conf(self.text("/etc/resolv.conf"))
        resolved = p.parse_networkd(self.text("/etc/systemd/resolved.conf"), "resolved")[1]
        dns_all = list(dict.fromkeys([*servers, *dns, *resolved]))
        gateways = list(dict.fromkeys(i["gateway"] for i in ifaces if i["gateway"]))
        legacy_gw = p.parse_env(self.text("/etc/sysconfig/network")).get("GATEWAY")
        if legacy_gw and legacy_gw not in gateways:
            gateways.append(legacy_gw)
        return {"hostname": self.hostname, "dns_servers": dns_all, "search_domains": search,
                "gateway": gateways[0] if gateways else None, "gateways": gateways,
                "interfaces": ifaces}

    def _interfaces(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Interfaces and extra DNS servers from interfaces, netplan, NM, ifcfg and networkd."""
        ifaces: list[dict[str, Any]] = []
        dns: list[str] = []
        for f in ["/etc/network/interfaces", *self.glob("/etc/network/interfaces.d", "*")]:
            ifaces += p.parse_interfaces(self.text(f), f)
        for f in self.glob("/etc/netplan", "*.yaml"):
            found, servers = p.parse_netplan(self.text(f), f)
            ifaces, dns = ifaces + found, dns + servers
        sources = [(self.glob("/etc/NetworkManager/system-connections", "*"), p.parse_nm_keyfile),
                   (self.glob("/etc/sysconfig/network-scripts", "ifcfg-*"), p.parse_ifcfg),
                   (self.glob("/etc/systemd/network", "*.network"), p.parse_networkd)]
        for files, parse in sources:
            for f in files:
                iface, servers = parse(self.text(f), f)
                if iface["name"] != "lo":
                    ifaces.append(iface)
                dns += servers
        return ifaces, dns

    @cached_property
    def fstab(self) -> list[dict[str, Any]]:
        """/etc/fstab entries."""
        return p.parse_fstab(self.text("/etc/fstab"))

    @cached_property
    def machine_id(self) -> str | None:
        """/etc/machine-id, None when missing or empty."""
        value = self.text("/etc/machine-id").strip()
        return value or None

    @cached_property
    def cloud_init(self) -> dict[str, Any]:
        """Whether cloud-init is installed and not disabled, and its datasources."""
        present = self.files.exists("/etc/cloud/cloud.cfg") or self.has_package("cloud-init")
        disabled = self.files.exists("/etc/cloud/cloud-init.disabled") or \
            "cloud-init=disabled" in self.text("/etc/default/grub")
        cfg = self.text("/etc/cloud/cloud.cfg")
        match = re.search(r"^datasource_list:\s*\[", cfg, re.M)
        end = cfg.find("]", match.end()) if match else -1  # one scan: the list ends at its "]"
        sources = [s.strip() for s in cfg[match.end():end].split(",") if s.strip()] \
            if match and end >= 0 else []
        return {"present": present, "enabled": present and not disabled, "datasources": sources}

    @cached_property
    def vm_tools(self) -> list[str]:
        """Guest agents and hypervisor tools found by their binaries or packages."""
        return [tool for tool, paths in _VM_TOOLS.items()
                if self.has_package(tool) or any(self.files.exists(x) for x in paths)]

    @cached_property
    def kernel_modules(self) -> list[str]:
        """Modules loaded at boot: /etc/modules and /etc/modules-load.d/*.conf."""
        names: list[str] = []
        for f in ["/etc/modules", *self.glob("/etc/modules-load.d", "*.conf")]:
            names += [line.split()[0] for line in self.text(f).splitlines()
                      if line.strip() and not line.lstrip().startswith(("#", ";"))]
        return sorted(set(names))


def _password_state(field: str | None) -> str:
    """'empty', 'locked', 'disabled', 'set' or 'unknown' for a shadow password field."""
    if field is None:
        return "unknown"
    if field == "":
        return "empty"
    if field.startswith("!"):
        return "locked"
    if field.startswith("*") or field in ("x", "NP"):
        return "disabled"
    return "set"


def unit_stem(name: str) -> str:
    """'telnet.socket' → 'telnet'; 'getty@tty1.service' → 'getty'; 'in.telnetd' → 'telnetd'."""
    stem = name.split("@", 1)[0]
    for suffix in _UNIT_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return stem.removeprefix("in.")
