"""Parsers of the Linux configuration and database files a guest inspection reads.

Each function turns the text of one file format into plain data. None of them touches
the image: `handlers.guestkit_facts` finds the files and feeds them here. The input is
untrusted, so malformed lines are skipped, never fatal.
"""

from __future__ import annotations

import configparser
import re
import shlex
from collections.abc import Callable
from typing import Any

__all__ = [
    "guest_int", "guest_name", "parse_apk_installed", "parse_dpkg_status", "parse_env",
    "parse_fstab", "parse_group",
    "parse_ifcfg", "parse_inetd", "parse_interfaces", "parse_login_defs", "parse_netplan",
    "parse_networkd", "parse_nm_keyfile", "parse_passwd", "parse_resolv_conf", "parse_shadow",
    "parse_sshd_config", "parse_xinetd",
]


def _lines(text: str) -> list[str]:
    """Non-empty lines with `#` comments and surrounding blanks removed."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


_SHELL_VALUE_MAX = 4096  #: longer values are unquoted by hand: shlex takes quadratic time


def guest_int(text: str) -> int | None:
    """A guest's decimal number (ASCII digits, at most 18 of them), None for anything else."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def guest_name(name: str) -> str:
    """A guest file name as valid text: bytes that are not UTF-8 become U+FFFD."""
    try:
        name.encode()
        return name
    except UnicodeEncodeError:
        pass
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def guest_text(value: Any) -> Any:
    """`value` (a report: dicts, lists, text) with every guest name in it made valid text by
    `guest_name`, keys too: whatever path a warning or a section quotes, the report encodes."""
    if isinstance(value, str):
        return guest_name(value)
    if isinstance(value, dict):
        return {guest_text(k): guest_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [guest_text(v) for v in value]
    return value


def parse_env(text: str) -> dict[str, str]:
    """KEY=value files (os-release, ifcfg, selinux/config, ufw.conf), quotes removed."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        try:
            if len(value) > _SHELL_VALUE_MAX:
                raise ValueError(value)
            words = shlex.split(value, comments=True)
        except ValueError:
            words = [value.strip().strip("\"'")]
        out[key.strip()] = " ".join(words)
    return out


def parse_login_defs(text: str) -> dict[str, str]:
    """`KEY value` lines of /etc/login.defs."""
    out: dict[str, str] = {}
    for line in _lines(text):
        parts = line.split(None, 1)
        if len(parts) == 2:
            out[parts[0]] = parts[1].strip()
    return out


def parse_passwd(text: str, limit: int = 1 << 62) -> list[dict[str, Any]]:
    """The first `limit` accounts of /etc/passwd; `no_password` marks an empty password field."""
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        if len(out) >= limit:
            break
        f = line.split(":")
        if len(f) < 7 or not f[0] or f[0][0] in "+-#":
            continue
        try:
            uid, gid = int(f[2]), int(f[3])
        except ValueError:
            continue
        out.append({"name": f[0], "uid": uid, "gid": gid, "gecos": f[4], "home": f[5],
                    "shell": f[6].strip(), "no_password": f[1] == ""})
    return out


def parse_shadow(text: str) -> dict[str, str]:
    """Account name → its password field in /etc/shadow ('' is an empty password)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        f = line.split(":")
        if len(f) >= 2 and f[0] and f[0][0] not in "+-#":
            out.setdefault(f[0], f[1])
    return out


def parse_group(text: str) -> dict[str, list[str]]:
    """Group name → member names from /etc/group."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        f = line.split(":")
        if len(f) >= 4 and f[0]:
            out[f[0]] = [m for m in f[3].strip().split(",") if m]
    return out


def _paragraphs(text: str) -> list[dict[str, str]]:
    """RFC 822 style paragraphs (dpkg status): `Key: value`, continuation lines skipped."""
    out: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                out.append(cur)
            cur = {}
        elif not line[0].isspace() and ":" in line:
            key, value = line.split(":", 1)
            cur[key.strip().lower()] = value.strip()
    if cur:
        out.append(cur)
    return out


def parse_dpkg_status(text: str) -> list[dict[str, str]]:
    """Installed packages (status `... installed`) of /var/lib/dpkg/status, sorted by name."""
    out = []
    for para in _paragraphs(text):
        if para.get("package") and para.get("status", "").endswith(" installed"):
            out.append({"name": para["package"], "version": para.get("version", ""),
                        "arch": para.get("architecture", "")})
    return sorted(out, key=lambda p: p["name"])


def parse_apk_installed(text: str) -> list[dict[str, str]]:
    """Packages of Alpine's /lib/apk/db/installed (P:, V:, A: lines per block)."""
    out: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if cur.get("P"):
                out.append({"name": cur["P"], "version": cur.get("V", ""), "arch": cur.get("A", "")})
            cur = {}
        elif len(line) > 2 and line[1] == ":":
            cur[line[0]] = line[2:].strip()
    return sorted(out, key=lambda p: p["name"])


_SSHD_KEYWORD = re.compile(r"([^\s=]+)\s*[=\s]\s*(\S.*)")


def parse_sshd_config(text: str, include: Callable[[str], list[str]], depth: int = 0,
                      into: dict[str, str] | None = None) -> dict[str, str]:
    """Effective global sshd options, lower-case keys, first value wins (as sshd reads them).

    `include(pattern)` returns the texts of the files an `Include` names; a `Match` block
    ends the global section.
    """
    opts = {} if into is None else into
    for line in _lines(text):
        parts = _SSHD_KEYWORD.match(line)  # `Keyword value` or `Keyword=value`, as sshd reads
        if parts is None:
            continue
        key, value = parts[1].lower(), parts[2].strip().strip('"')
        if key == "match":
            break
        if key == "include" and depth < 8:
            for pattern in value.split():
                for sub in include(pattern):
                    parse_sshd_config(sub, include, depth + 1, opts)
        else:
            opts.setdefault(key, value)
    return opts


def parse_resolv_conf(text: str) -> tuple[list[str], list[str]]:
    """(nameservers, search domains) of resolv.conf."""
    servers, search = [], []
    for line in _lines(text):
        parts = line.split()
        if parts[0] == "nameserver" and len(parts) > 1:
            servers.append(parts[1])
        elif parts[0] in ("search", "domain"):
            search.extend(parts[1:])
    return servers, search


def parse_fstab(text: str) -> list[dict[str, Any]]:
    """Entries of /etc/fstab: device, mountpoint, fstype, options, dump, pass."""
    out = []
    for line in _lines(text):
        f = line.split()
        if len(f) < 3:
            continue
        out.append({"device": f[0], "mountpoint": f[1], "fstype": f[2],
                    "options": f[3] if len(f) > 3 else "defaults",
                    "dump": (guest_int(f[4]) if len(f) > 4 else None) or 0,
                    "pass": (guest_int(f[5]) if len(f) > 5 else None) or 0})
    return out


def _iface(name: str, source: str) -> dict[str, Any]:
    """An empty interface record."""
    return {"name": name, "source": source, "method": None, "addresses": [], "gateway": None}


def parse_interfaces(text: str, source: str) -> list[dict[str, Any]]:
    """Stanzas of Debian's /etc/network/interfaces: method, address, gateway per interface."""
    out: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    for line in _lines(text):
        parts = line.split()
        if parts[0] == "iface" and len(parts) >= 4:
            cur = _iface(parts[1], source)
            cur["method"] = parts[3]
            out.append(cur)
        elif parts[0] in ("auto", "allow-hotplug", "mapping", "source", "source-directory"):
            cur = None if parts[0] != "auto" else cur
        elif cur is not None and len(parts) > 1 and parts[0] == "address":
            cur["addresses"].append(parts[1])
        elif cur is not None and len(parts) > 1 and parts[0] == "gateway":
            cur["gateway"] = parts[1]
    return [i for i in out if i["name"] != "lo"]


_NETPLAN_KEY = re.compile(r"^(\s*)(-\s+)?([A-Za-z0-9_.-]+):\s*(.*)$")
_NETPLAN_GROUPS = ("ethernets", "bonds", "bridges", "vlans", "wifis")
_DEFAULT_ROUTES = ("default", "0.0.0.0/0", "::/0")


def parse_netplan(text: str, source: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(interfaces, nameservers) from a netplan YAML file, read by indentation."""
    out: list[dict[str, Any]] = []
    dns: list[str] = []
    stack: list[tuple[int, str]] = []
    cur: dict[str, Any] | None = None
    route_to = list_key = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        m = _NETPLAN_KEY.match(line)
        if not m:
            if cur is not None and list_key and line.strip().startswith("- "):
                (dns if list_key == "dns" else cur["addresses"]).append(_unquote(line.strip()[2:]))
            continue
        indent = len(m.group(1)) + len(m.group(2) or "")
        key, value = m.group(3), m.group(4).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parents = [k for _, k in stack]
        stack.append((indent, key))
        if parents and parents[-1] in _NETPLAN_GROUPS and not value:
            cur = _iface(key, source)
            out.append(cur)
        elif cur is not None:
            list_key = ("dns" if "nameservers" in parents else "addr") if key == "addresses" else None
            route_to = value if key == "to" else route_to
            _netplan_key(cur, dns, key, value, list_key, route_to)
    for iface in out:
        iface["method"] = iface["method"] or ("static" if iface["addresses"] else None)
    return out, dns


def _unquote(value: str) -> str:
    """A YAML scalar without its quotes."""
    return value.strip().strip("'\"")


def _netplan_key(cur: dict[str, Any], dns: list[str], key: str, value: str,
                 list_key: str | None, route_to: str | None) -> None:
    """Apply one `key: value` line of a netplan interface to `cur` / `dns`."""
    if list_key and value:
        items = [_unquote(v) for v in value.strip("[]").split(",") if v.strip()]
        (dns if list_key == "dns" else cur["addresses"]).extend(items)
    elif key in ("gateway4", "gateway6") or (key == "via" and route_to in _DEFAULT_ROUTES):
        cur["gateway"] = cur["gateway"] or _unquote(value)
    elif key in ("dhcp4", "dhcp6") and value.lower() in ("true", "yes"):
        cur["method"] = "dhcp"


def parse_nm_keyfile(text: str, source: str) -> tuple[dict[str, Any], list[str]]:
    """(interface, nameservers) from a NetworkManager .nmconnection keyfile."""
    ini = configparser.ConfigParser(strict=False, interpolation=None)
    try:
        ini.read_string(text)
    except configparser.Error:
        return _iface("?", source), []
    con = ini["connection"] if ini.has_section("connection") else {}
    iface = _iface(con.get("interface-name") or con.get("id") or "?", source)
    dns: list[str] = []
    for sect in ("ipv4", "ipv6"):
        if not ini.has_section(sect):
            continue
        s = ini[sect]
        iface["method"] = iface["method"] or s.get("method")
        for key, value in s.items():
            if re.fullmatch(r"address(es)?\d*", key):
                addr, _, gw = value.partition(",")
                iface["addresses"].append(addr.strip())
                iface["gateway"] = iface["gateway"] or (gw.strip() or None)
        iface["gateway"] = iface["gateway"] or s.get("gateway")
        dns += [d for d in s.get("dns", "").replace(",", ";").split(";") if d.strip()]
    return iface, dns


def parse_ifcfg(text: str, source: str) -> tuple[dict[str, Any], list[str]]:
    """(interface, nameservers) from a RHEL network-scripts ifcfg-* file."""
    env = parse_env(text)
    iface = _iface(env.get("DEVICE") or env.get("NAME") or "?", source)
    iface["method"] = env.get("BOOTPROTO")
    if env.get("IPADDR"):
        prefix = env.get("PREFIX")
        iface["addresses"].append(env["IPADDR"] + (f"/{prefix}" if prefix else ""))
    iface["gateway"] = env.get("GATEWAY")
    return iface, [v for k, v in sorted(env.items()) if re.fullmatch(r"DNS\d+", k)]


def parse_networkd(text: str, source: str) -> tuple[dict[str, Any], list[str]]:
    """(interface, nameservers) from a systemd-networkd .network file."""
    iface, dns = _iface("?", source), []
    for line in _lines(text):
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            continue
        if key == "Name":
            iface["name"] = value
        elif key == "Address":
            iface["addresses"].append(value)
        elif key == "Gateway":
            iface["gateway"] = iface["gateway"] or value
        elif key == "DNS":
            dns.extend(value.split())
        elif key == "DHCP" and value.lower() in ("yes", "true", "ipv4", "ipv6"):
            iface["method"] = "dhcp"
    return iface, dns


def parse_inetd(text: str) -> list[str]:
    """Service names enabled (not commented out) in /etc/inetd.conf."""
    return [line.split()[0] for line in _lines(text) if len(line.split()) >= 6]


def parse_xinetd(text: str) -> list[tuple[str, bool]]:
    """(service name, enabled) for each `service` block of an xinetd file."""
    out: list[tuple[str, bool]] = []
    pos = 0
    while m := _XINETD_SERVICE.search(text, pos):  # a block runs to the next "}": none, no more
        end = text.find("}", m.end())
        if end < 0:
            break
        disabled = re.search(r"^[ \t]*disable[ \t]*=[ \t]*yes\b", text[m.end():end], re.M | re.I)
        out.append((m.group(1), not disabled))
        pos = end + 1
    return out


_XINETD_SERVICE = re.compile(r"service\s+(\S+)\s*\{")
