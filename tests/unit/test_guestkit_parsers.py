"""The guest file parsers, guest facts and profile checks, on real files in a directory tree."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from handlers import guestkit_parsers as p
from handlers.guestkit_checks import run_profile
from handlers.guestkit_facts import GuestFacts
from handlers.guestkit_formats import normalize_format
from handlers.guestkit_output import to_yaml
from handlers.guestkit_rpmdb import RpmdbError, parse_header


class DirFiles:
    """A guest root that is a plain directory (the GuestFiles interface over the host fs)."""

    def __init__(self, root: Path) -> None:
        """Serve guest paths from under `root`."""
        self.root = root

    def _host(self, guest_path: str) -> Path:
        """The host path of a guest path."""
        return self.root / guest_path.lstrip("/")

    def read_bytes(self, guest_path: str, limit: int = 1 << 26) -> bytes | None:
        """A file's bytes, None when missing."""
        try:
            return self._host(guest_path).read_bytes()[:limit]
        except OSError:
            return None

    def read_text(self, guest_path: str) -> str | None:
        """A file's text, None when missing."""
        data = self.read_bytes(guest_path)
        return None if data is None else data.decode()

    def exists(self, guest_path: str) -> bool:
        """Whether the guest path exists."""
        return self._host(guest_path).exists()

    def listdir(self, guest_path: str) -> list[str]:
        """Sorted names in a guest directory, [] when missing."""
        try:
            return sorted(os.listdir(self._host(guest_path)))
        except OSError:
            return []


def tree(root: Path, files: dict[str, str]) -> DirFiles:
    """Write `files` (guest path → text) under `root`."""
    for path, text in files.items():
        host = root / path.lstrip("/")
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_text(text)
    return DirFiles(root)


def test_sshd_config_first_value_wins_includes_first_and_match_ends_globals() -> None:
    texts = {"/etc/ssh/sshd_config.d/*.conf": ["PermitRootLogin no\n"]}
    conf = ("Include /etc/ssh/sshd_config.d/*.conf\nPermitRootLogin yes  # comment\n"
            "PasswordAuthentication yes\nPasswordAuthentication no\n"
            "Match User bob\n  PermitEmptyPasswords yes\n")
    opts = p.parse_sshd_config(conf, lambda pattern: texts.get(pattern, []))
    assert opts == {"permitrootlogin": "no", "passwordauthentication": "yes"}


def test_dpkg_status_keeps_installed_packages_only() -> None:
    text = ("Package: a\nStatus: install ok installed\nVersion: 1\nArchitecture: amd64\n"
            "Description: x\n continued line: not a key\n\n"
            "Package: b\nStatus: deinstall ok config-files\nVersion: 2\n\n"
            "Package: c\nStatus: hold ok installed\nVersion: 3\n")
    assert p.parse_dpkg_status(text) == [{"name": "a", "version": "1", "arch": "amd64"},
                                         {"name": "c", "version": "3", "arch": ""}]


def test_passwd_and_shadow_skip_malformed_and_nis_lines() -> None:
    users = p.parse_passwd("root:x:0:0:root:/root:/bin/bash\n+::::::\nbad\nx:x:NaN:0::/:/bin/sh\n")
    assert [u["name"] for u in users] == ["root"]
    assert p.parse_shadow("bob::1:0:99999:7:::\nroot:!:1::::::\n") == {"bob": "", "root": "!"}


def test_network_config_styles_give_interfaces_gateways_and_dns() -> None:
    nm, nm_dns = p.parse_nm_keyfile("[connection]\nid=x\ninterface-name=ens3\n[ipv4]\n"
                                    "method=manual\naddress1=10.0.0.2/24,10.0.0.1\n"
                                    "dns=10.0.0.53;10.0.0.54;\n", "nm")
    assert (nm["name"], nm["gateway"], nm["addresses"], nm_dns) == \
        ("ens3", "10.0.0.1", ["10.0.0.2/24"], ["10.0.0.53", "10.0.0.54"])
    ifcfg, ifcfg_dns = p.parse_ifcfg('DEVICE=eth1\nBOOTPROTO=none\nIPADDR=10.1.0.5\nPREFIX=16\n'
                                     'GATEWAY="10.1.0.1"\nDNS1=10.1.0.53\n', "ifcfg")
    assert (ifcfg["addresses"], ifcfg["gateway"], ifcfg_dns) == \
        (["10.1.0.5/16"], "10.1.0.1", ["10.1.0.53"])
    nd, nd_dns = p.parse_networkd("[Match]\nName=en*\n[Network]\nDNS=9.9.9.9\n[Route]\n"
                                  "Gateway=10.2.0.1\n", "nd")
    assert (nd["name"], nd["gateway"], nd_dns) == ("en*", "10.2.0.1", ["9.9.9.9"])
    plan, plan_dns = p.parse_netplan(
        "network:\n  ethernets:\n    eth0:\n      dhcp4: true\n      nameservers:\n"
        "        addresses: [1.1.1.1]\n      routes:\n        - to: 10.9.0.0/16\n"
        "          via: 10.0.0.9\n        - to: default\n          via: 10.0.0.1\n", "np")
    assert (plan[0]["method"], plan[0]["gateway"], plan_dns) == ("dhcp", "10.0.0.1", ["1.1.1.1"])
    debian = p.parse_interfaces("auto lo\niface lo inet loopback\niface eth0 inet dhcp\n", "if")
    assert [(i["name"], i["method"]) for i in debian] == [("eth0", "dhcp")]


def test_rpm_header_blob_decoding_and_bounds() -> None:
    store = b"bash\x005.1.8\x006.el9\x00"
    index = [(1000, 6, 0, 1), (1001, 6, 5, 1), (1002, 6, 11, 1), (1003, 4, 20, 1)]
    data = store + b"\0\0\0" + struct.pack(">i", 2)  # the INT32 epoch aligned at offset 20
    blob = struct.pack(">II", len(index), len(data)) + b"".join(
        struct.pack(">iiii", *e) for e in index) + data
    assert parse_header(blob) == {"name": "bash", "version": "5.1.8", "release": "6.el9",
                                  "epoch": 2}
    with pytest.raises(RpmdbError, match="out of range"):
        parse_header(struct.pack(">II", 70000, 0))


def test_format_names_and_yaml_output() -> None:
    assert [normalize_format(n) for n in ("QCOW2", "img", "vpc")] == ["qcow2", "raw", "vhd"]
    with pytest.raises(ValueError, match="unsupported image format 'iso'"):
        normalize_format("iso")
    data = {"a": [{"id": "X", "n": None, "s": "yes"}, []], "b": {"c": "x: y", "d": 1.5}}
    text = to_yaml(data)
    assert text == ('a:\n  - id: X\n    "n": null\n    s: "yes"\n  - []\nb:\n  c: "x: y"\n'
                    '  d: 1.5\n')
    # a value read from an image may end in a newline: quoted, or YAML would drop it
    assert to_yaml({"h": "web01\n"}) == 'h: "web01\\n"\n'
    yaml = pytest.importorskip("yaml", reason="PyYAML absent: emitter checked by text only")
    assert yaml.safe_load(text) == json.loads(json.dumps(data))


def test_facts_and_checks_on_a_rhel_like_tree_with_legacy_services(tmp_path: Path) -> None:
    files = tree(tmp_path, {
        "/etc/os-release": 'ID="almalinux"\nID_LIKE="rhel centos fedora"\nVERSION_ID="8.9"\n',
        "/etc/passwd": "root:x:0:0::/root:/bin/bash\ntoor:x:0:0::/root:/bin/sh\n",
        "/etc/shadow": "root:$6$x:1::::::\ntoor:$6$y:1::::::\n",
        "/etc/ssh/sshd_config": "PermitEmptyPasswords yes\nPasswordAuthentication no\n",
        "/etc/xinetd.d/rsh": "service shell\n{\n disable = no\n}\nservice rsh\n{\n}\n",
        "/etc/xinetd.d/tftp": "service tftp\n{\n\tdisable\t= yes\n}\n",
        "/etc/inetd.conf": "#telnet stream tcp nowait root /usr/sbin/in.telnetd\n"
                           "talk dgram udp wait nobody /usr/sbin/in.talkd in.talkd\n",
        "/etc/rc3.d/S20rlogin": "", "/etc/ufw/ufw.conf": "ENABLED=yes\n", "/etc/rcS.d/S12ufw": "",
        "/etc/default/grub": 'GRUB_CMDLINE_LINUX="quiet"\n',
    })
    facts = GuestFacts(files)
    assert facts.selinux == {"mode": "disabled", "policy": None, "enabled": False,
                             "configured": False}
    assert facts.services["xinetd"] == ["rsh", "shell"] and facts.services["inetd"] == ["talk"]
    assert facts.firewall["ufw"] == {"present": True, "enabled": True}
    ids = {f["id"]: f for prof in ("security", "compliance", "hardening")
           for f in run_profile(prof, facts, None)}
    assert {"CIS-AUTH-002", "CIS-SSH-003", "CIS-MAC-001", "CIS-SVC-001"} <= set(ids)
    assert {"CIS-FW-001", "CIS-SSH-002", "CIS-SSH-001", "CIS-AUTH-001"}.isdisjoint(ids)
    assert ids["CIS-AUTH-002"]["affected"] == ["toor"]
    assert ids["CIS-SVC-001"]["affected"] == ["rlogin (rlogin, sysv)", "rsh (rsh, xinetd)",
                                              "talk (talk, inetd)"]


def test_ufw_counts_as_enabled_only_when_its_boot_service_is(tmp_path: Path) -> None:
    files = tree(tmp_path, {"/etc/ufw/ufw.conf": "ENABLED=yes\n",
                            "/usr/lib/systemd/system/ufw.service": ""})
    facts = GuestFacts(files)  # ENABLED=yes, but nothing starts ufw at boot
    assert facts.firewall["ufw"] == {"present": True, "enabled": False}
    [finding] = [f for f in run_profile("security", facts, None) if f["id"] == "CIS-FW-001"]
    assert "configured but not enabled: ufw" in finding["description"]
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "ufw.service").symlink_to("/usr/lib/systemd/system/ufw.service")
    facts = GuestFacts(files)
    assert facts.firewall["ufw"] == {"present": True, "enabled": True}
    assert "CIS-FW-001" not in {f["id"] for f in run_profile("security", facts, None)}
    (wants / "ufw.service").unlink()
    rcs = tmp_path / "etc/rcS.d"
    rcs.mkdir()
    (rcs / "S01ufw").write_text("")  # sysv's link: it starts ufw...
    assert GuestFacts(files).firewall["ufw"]["enabled"] is True
    (tmp_path / "etc/systemd/system/ufw.service").symlink_to("/dev/null/masked")  # ...unless masked
    assert GuestFacts(files).firewall["ufw"]["enabled"] is False


def test_masked_units_are_not_enabled_and_selinux_zero_on_the_cmdline_disables(
        tmp_path: Path) -> None:
    files = tree(tmp_path, {
        "/etc/selinux/config": "SELINUX=enforcing\n",
        "/etc/kernel/cmdline": "root=/dev/vda1 selinux=0\n",
        "/usr/lib/systemd/system/telnet.socket": "",
    })
    wants = tmp_path / "etc/systemd/system/sockets.target.wants"
    wants.mkdir(parents=True)
    (wants / "telnet.socket").symlink_to("/usr/lib/systemd/system/telnet.socket")
    (tmp_path / "etc/systemd/system/telnet.socket").symlink_to("/dev/null/masked")
    facts = GuestFacts(files)
    assert facts.services["systemd"] == []
    assert facts.selinux is not None and facts.selinux["mode"] == "disabled"


def test_a_worker_without_image_roots_says_which_setting_gives_them() -> None:
    from handlers.guestkit_image import resolve_within
    from worker.errors import HandlerError

    with pytest.raises(HandlerError) as info:
        resolve_within("/images/a.qcow2", [], "payload.data.image.path", "image roots")
    assert str(info.value) == ("payload.data.image.path: this worker has no image roots "
                               "configured (--image-root, or image_roots in its config)")


# ---------------------------------------------------------------- a hostile guest's files


class CountingFiles(DirFiles):
    """DirFiles that counts the reads of each guest path and the bytes read in all."""

    def __init__(self, root: Path) -> None:
        """Serve guest paths from under `root`, counting."""
        super().__init__(root)
        self.reads: dict[str, int] = {}
        self.bytes = 0
        self.listings = 0

    def listdir(self, guest_path: str) -> list[str]:
        """Sorted names in a guest directory, [] when missing; counted."""
        self.listings += 1
        return super().listdir(guest_path)

    def read_text(self, guest_path: str) -> str | None:
        """A file's text (bad bytes replaced), None when missing; counted."""
        self.reads[guest_path] = self.reads.get(guest_path, 0) + 1
        data = self.read_bytes(guest_path)
        self.bytes += len(data or b"")
        return None if data is None else data.decode("utf-8", "replace")


@pytest.mark.timeout(60, method="thread")  # unbounded, it ran for hours
def test_sshd_includes_of_itself_and_of_a_glob_read_each_file_once(tmp_path: Path) -> None:
    """Each of these files named every other: sshd would read each once; so do we (it read
    them k**8 times, a job's whole timeout for a 200-byte file)."""
    conf = {f"/etc/ssh/sshd_config.d/{i}.conf": "Include /etc/ssh/sshd_config.d/*\n"
            for i in range(6)}
    tree(tmp_path, {"/etc/ssh/sshd_config": "Include /etc/ssh/sshd_config " * 10 + "\n"
                    "Include sshd_config.d/*.conf\nPermitRootLogin=yes\n", **conf})
    files = CountingFiles(tmp_path)
    facts = GuestFacts(files)
    assert facts.sshd is not None and facts.sshd["permitrootlogin"] == "yes"  # Keyword=value
    assert set(files.reads.values()) == {1}, files.reads
    assert "CIS-SSH-001" in {f["id"] for f in run_profile("security", facts, None)}


def test_an_sshd_include_with_wildcards_in_its_directories_is_followed(tmp_path: Path) -> None:
    tree(tmp_path, {"/etc/ssh/sshd_config": "Include /etc/ssh/conf*.d/*.conf\n",
                    "/etc/ssh/conf-b.d/10.conf": "PermitRootLogin yes\n",
                    "/etc/ssh/conf-a.d/20.conf": "PasswordAuthentication yes\n",
                    "/etc/ssh/conf-a.d/ignored.txt": "PermitRootLogin no\n"})
    facts = GuestFacts(DirFiles(tmp_path))
    assert facts.sshd == {"passwordauthentication": "yes", "permitrootlogin": "yes"}
    assert "CIS-SSH-001" in {f["id"] for f in run_profile("security", facts, None)}


def test_more_sshd_includes_than_allowed_are_one_warning(tmp_path: Path, monkeypatch) -> None:
    import handlers.guestkit_facts as facts_module

    monkeypatch.setattr(facts_module, "SSHD_INCLUDES", 3)
    conf = {f"/etc/ssh/sshd_config.d/{i}.conf": "Include /etc/ssh/sshd_config.d/*\n"
            for i in range(6)}
    tree(tmp_path, {"/etc/ssh/sshd_config": "Include sshd_config.d/*\n", **conf})
    files = CountingFiles(tmp_path)
    facts = GuestFacts(files)
    assert facts.sshd == {}
    assert sorted(files.reads) == ["/etc/ssh/sshd_config", "/etc/ssh/sshd_config.d/0.conf",
                                   "/etc/ssh/sshd_config.d/1.conf"]
    assert facts.warnings == [
        "sshd_config includes more than 3 files or 12 patterns; the rest were not read"]


def test_sshd_include_lines_beyond_the_pattern_cap_list_no_directory(tmp_path: Path) -> None:
    """Each Include lists its directories: 2,000 of them over 2,000 files took seconds."""
    conf = {f"/etc/ssh/d/{i}.conf": "" for i in range(50)}
    tree(tmp_path, {"/etc/ssh/sshd_config": "Include /etc/ssh/d/*\n" * 2000, **conf})
    files = CountingFiles(tmp_path)
    facts = GuestFacts(files)
    assert facts.sshd == {}
    assert files.listings <= 4 * 256 + 1
    assert len(files.reads) == 51


def test_sshd_include_globs_skip_hidden_files_as_sshd_does(tmp_path: Path) -> None:
    tree(tmp_path, {"/etc/ssh/sshd_config": "Include /etc/ssh/sshd_config.d/*.conf\n",
                    "/etc/ssh/sshd_config.d/.hidden.conf": "PasswordAuthentication yes\n",
                    "/etc/ssh/sshd_config.d/50-a.conf": "PasswordAuthentication no\n"})
    assert GuestFacts(DirFiles(tmp_path)).sshd == {"passwordauthentication": "no"}


def test_many_names_for_one_large_file_stop_at_the_reading_budget(tmp_path: Path,
                                                                  monkeypatch) -> None:
    import handlers.guestkit_facts as facts_module

    monkeypatch.setattr(facts_module, "TEXT_BUDGET", 4 << 20)  # 64 MiB in a job
    big = tmp_path / "big"
    big.write_bytes("\U0001f600".encode() * (1 << 18))  # 1 MiB in 4-byte characters
    (tmp_path / "etc/modules-load.d").mkdir(parents=True)
    for i in range(40):
        (tmp_path / f"etc/modules-load.d/{i:02d}.conf").symlink_to(big)
    files = CountingFiles(tmp_path)
    facts = GuestFacts(files)
    assert len(facts.kernel_modules) <= 5
    assert files.bytes <= 5 << 20
    assert facts.warnings == [f"configuration files past the first {4 << 20} bytes were not read"]


def test_too_many_accounts_are_cut_with_a_warning(tmp_path: Path, monkeypatch) -> None:
    import handlers.guestkit_facts as facts_module

    monkeypatch.setattr(facts_module, "MAX_ACCOUNTS", 3)
    tree(tmp_path, {"/etc/passwd": "".join(f"u{i}:x:{i}:0::/:/bin/sh\n" for i in range(10))})
    facts = GuestFacts(DirFiles(tmp_path))
    assert [a["name"] for a in facts.accounts] == ["u0", "u1", "u2"]
    assert facts.warnings == ["/etc/passwd lists more than 3 accounts; the first 3 are reported"]


@pytest.mark.timeout(60, method="thread")  # the unbounded forms took hours, in C (a regex)
def test_unclosed_xinetd_blocks_and_a_huge_shell_value_are_read_in_linear_time() -> None:
    assert p.parse_xinetd("service a {\n" * 200_000) == []
    assert p.parse_xinetd("service a {\n" + "\n" * 400_000 + "}") == [("a", True)]
    assert p.parse_xinetd("service a {\nservice b {\n disable = yes\n}\nservice c {\n}\n") == [
        ("a", False), ("c", True)]  # a block runs to the next "}", as before
    value = "a" * 2_000_000
    assert p.parse_env(f'X="{value}"\nY=1\n') == {"X": value, "Y": "1"}


@pytest.mark.timeout(60, method="thread")  # unbounded, many unclosed lists took minutes
def test_unclosed_cloud_init_datasource_lists_are_read_in_linear_time(tmp_path: Path) -> None:
    tree(tmp_path, {"/etc/cloud/cloud.cfg": "datasource_list: [\n" * 200_000})
    assert GuestFacts(DirFiles(tmp_path)).cloud_init["datasources"] == []
    tree(tmp_path, {"/etc/cloud/cloud.cfg": "x: 1\ndatasource_list: [ NoCloud,\n  None ]\n"})
    assert GuestFacts(DirFiles(tmp_path)).cloud_init["datasources"] == ["NoCloud", "None"]


def test_numbers_a_guest_writes_oddly_are_unknown_not_errors(tmp_path: Path) -> None:
    tree(tmp_path, {
        "/etc/os-release": 'ID=debian\nVERSION_ID="\u00b2.\u00b3"\n',
        "/etc/login.defs": "PASS_MAX_DAYS \u00b2\nUID_MIN \u00b9\nPASS_MIN_DAYS " + "9" * 5000 + "\n",
        "/etc/fstab": "/dev/vda1 / ext4 defaults \u00b9 \u00b2\n",
        "/etc/passwd": "root:x:0:0::/root:/bin/bash\n",
    })
    facts = GuestFacts(DirFiles(tmp_path))
    osys = facts.operating_system("linux")
    assert (osys["major_version"], osys["minor_version"]) == (None, None)
    assert facts.accounts[0]["name"] == "root"
    assert p.parse_fstab(facts.text("/etc/fstab"))[0]["dump"] == 0
    ids = {f["id"] for prof in ("security", "compliance", "hardening")
           for f in run_profile(prof, facts, None)}
    assert "CIS-PWD-001" in ids  # PASS_MAX_DAYS is not a number: as if unset
    assert p.guest_int("-1") is None and p.guest_int("42") == 42


def test_names_that_are_not_utf8_are_reported_as_valid_text(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path)
    os.makedirs(root + b"/usr/lib/modules/6.1.0-\xff")
    os.makedirs(root + b"/etc/systemd/system/multi-user.target.wants")
    os.symlink(b"/dev/null", root + b"/etc/systemd/system/multi-user.target.wants/telnet\xff.service")
    facts = GuestFacts(SurrogateFiles(tmp_path))
    assert facts.kernels == ["6.1.0-\ufffd"]
    assert facts.services["systemd"] == ["telnet\ufffd.service"]
    json.dumps(facts.kernels + facts.services["systemd"]).encode()  # valid UTF-8 text


class SurrogateFiles(DirFiles):
    """DirFiles listing names as the image library does: undecodable bytes as surrogates."""

    def listdir(self, guest_path: str) -> list[str]:
        """Sorted names, bytes that are not UTF-8 as lone surrogates."""
        try:
            return sorted(os.fsdecode(n) for n in os.listdir(os.fsencode(self._host(guest_path))))
        except OSError:
            return []


def _rpmdb(path: Path, *statements: str) -> bytes:
    """An sqlite database made by `statements`, as bytes."""
    import sqlite3

    con = sqlite3.connect(path)
    for sql in statements:
        con.execute(sql)
    con.commit()
    con.close()
    return path.read_bytes()


@pytest.mark.timeout(60, method="thread")  # unrefused, each query runs for ever or fills memory
@pytest.mark.parametrize(("schema", "message"), [
    (["CREATE VIEW Packages AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
      "SELECT x AS blob FROM c WHERE x < 0"], "its Packages is a view, not a table"),
    (["CREATE VIRTUAL TABLE Packages USING fts5(blob)"], "its Packages is a virtual table"),
    (["CREATE TABLE Packages (hnum INTEGER, blob BLOB GENERATED ALWAYS AS (zeroblob(200000000)))",
      "INSERT INTO Packages (hnum) VALUES (1), (2), (3)"], "Packages.blob is computed when read"),
], ids=["view", "virtual", "generated"])
def test_an_rpmdb_whose_packages_runs_guest_code_is_refused(
        tmp_path: Path, schema: list[str], message: str) -> None:
    from handlers.guestkit_rpmdb import read_packages

    with pytest.raises(RpmdbError, match=message):
        read_packages(_rpmdb(tmp_path / "rpmdb.sqlite", *schema))


def test_an_rpmdb_query_past_its_step_budget_stops(tmp_path: Path, monkeypatch) -> None:
    import handlers.guestkit_rpmdb as rpmdb

    monkeypatch.setattr(rpmdb, "_MAX_SQL_STEPS", 200_000)
    db = _rpmdb(tmp_path / "rpmdb.sqlite", "CREATE TABLE Packages (hnum INTEGER, blob BLOB)",
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000) "
                "INSERT INTO Packages SELECT x, x'00' FROM c")
    with pytest.raises(RpmdbError, match="took over 200000 sqlite steps"):
        rpmdb.read_packages(db)


def test_an_rpm_header_naming_a_tag_twice_keeps_the_first() -> None:
    store = b"bash\x00evil\x00"
    index = [(1000, 6, 0, 1), (1000, 6, 5, 1)]
    blob = struct.pack(">II", len(index), len(store)) + b"".join(
        struct.pack(">iiii", *e) for e in index) + store
    assert parse_header(blob) == {"name": "bash"}


def test_an_empty_password_field_in_passwd_itself_is_critical(tmp_path: Path) -> None:
    """With nothing in its password field, /etc/passwd's account needs no password whatever
    /etc/shadow says."""
    tree(tmp_path, {"/etc/passwd": "root:x:0:0::/root:/bin/bash\nopen::1000:1000::/home/o:/bin/sh\n",
                    "/etc/shadow": "root:$6$x:1::::::\nopen:$6$y:1::::::\n"})
    facts = GuestFacts(DirFiles(tmp_path))
    assert [(a["name"], a["password"]) for a in facts.accounts] == [("root", "set"), ("open", "empty")]
    assert "no_password" not in facts.accounts[1]  # the report keeps its fields
    found = {f["id"]: f for f in run_profile("security", facts, None)}
    assert found["CIS-AUTH-001"]["affected"] == ["open"]


@pytest.mark.parametrize(("where", "option", "mode"), [
    ("/boot/loader/entries/abc-5.14.conf", "options root=/dev/vda2 ro enforcing=0", "permissive"),
    ("/boot/loader/entries/abc-5.14.conf", "options root=/dev/vda2 ro selinux=0", "disabled"),
    ("/boot/grub2/grubenv", "kernelopts=root=/dev/vda2 enforcing=0", "permissive"),
    ("/etc/default/grub", 'GRUB_CMDLINE_LINUX="quiet enforcing=0"', "permissive"),
    ("/etc/default/grub", '# GRUB_CMDLINE_LINUX="quiet enforcing=0"', "enforcing"),
    ("/etc/default/grub", 'GRUB_CMDLINE_LINUX="quiet noenforcing=0 enforcing=01"', "enforcing"),
    ("/boot/loader/entries/abc-5.14.conf", "title enforcing=0", "enforcing"),
])
def test_selinux_turned_down_on_the_kernel_command_line_counts(
        tmp_path: Path, where: str, option: str, mode: str) -> None:
    tree(tmp_path, {"/etc/selinux/config": "SELINUX=enforcing\nSELINUXTYPE=targeted\n",
                    where: f"title x\n{option}\n"})
    facts = GuestFacts(DirFiles(tmp_path))
    assert facts.selinux is not None and facts.selinux["mode"] == mode
    ids = {f["id"] for prof in ("security", "compliance", "hardening")
           for f in run_profile(prof, facts, None)}
    expected = {"permissive": {"CIS-MAC-002"}, "disabled": {"CIS-MAC-001"}, "enforcing": set()}
    assert ids & {"CIS-MAC-001", "CIS-MAC-002"} == expected[mode]


def test_a_uid_min_of_zero_is_a_setting_not_an_absence(tmp_path: Path) -> None:
    tree(tmp_path, {"/etc/login.defs": "UID_MIN 0\n",
                    "/etc/passwd": "root:x:0:0::/root:/bin/bash\nsvc:x:500:500::/:/bin/sh\n"})
    assert [a["system"] for a in GuestFacts(DirFiles(tmp_path)).accounts] == [False, False]
