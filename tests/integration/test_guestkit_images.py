"""guestkit.inspect, .profile and .convert on real disk images built by scripts/mkimages.sh.

The handlers are called directly (validate, then execute with a real Context); the
end-to-end runs through the supervisor live with the supervisor's tests.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from handlers.base import Context, HandlerResult
from handlers.guestkit_convert import ConvertHandler
from handlers.guestkit_inspect import InspectHandler
from handlers.guestkit_profile import ProfileHandler
from worker.errors import HandlerError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT.parent / "shared" / "examples"
MiB = 1024 * 1024
WEAK_FINDINGS = {"CIS-AUTH-001", "CIS-SSH-001", "CIS-SSH-002", "CIS-FW-001", "CIS-PWD-001",
                 "CIS-PWD-002", "CIS-FS-001", "CIS-FS-002", "CIS-FS-003", "CIS-SVC-001"}
ALL_PROFILES = ["security", "compliance", "hardening"]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def dissect_ready() -> None:
    """The inspection extra must be importable for inspect/profile."""
    reason = InspectHandler.unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture()
def outdir(tmp_path: Path) -> Path:
    """The output directory of one test."""
    out = tmp_path / "out"
    out.mkdir()
    return out


@pytest.fixture()
def settings(images: Path, outdir: Path) -> dict[str, Any]:
    """Worker settings: the fixture images are the only image root."""
    return {"image_roots": [str(images)], "output_dir": str(outdir)}


@pytest.fixture(scope="session")
def warm(dissect_ready: None) -> None:
    """prepare() once per session, as the process jobs are forked from does."""
    InspectHandler({}).prepare()


class Job:
    """A real Context whose messages are collected."""

    def __init__(self, tmp: Path, out: Path, job_id: str = "job-1") -> None:
        """A Context for `job_id` with its own work dir."""
        self.messages: list[dict[str, Any]] = []
        workdir = tmp / f"work-{job_id}"
        workdir.mkdir(exist_ok=True)
        self.ctx = Context(job_id=job_id, operation="guestkit", attempt=1, workdir=workdir,
                           output_dir=out, limits={}, settings={}, send=self.messages.append)

    def progress(self, phase: str | None = None) -> list[tuple[str, int | None, str]]:
        """(phase, percent, message) of each progress report, optionally of one phase."""
        return [(m["phase"], m["percent"], m["message"]) for m in self.messages
                if m["type"] == "progress" and (phase is None or m["phase"] == phase)]


def run(handler: Any, data: dict[str, Any], tmp: Path, out: Path,
        job_id: str = "job-1") -> tuple[HandlerResult, Job]:
    """validate() then execute() like the supervisor and the child do."""
    job = Job(tmp, out, job_id)
    payload = handler.validate(data)
    result = handler.execute(job.ctx, payload)
    assert isinstance(result, HandlerResult)
    return result, job


def inspect(images: Path, name: str, settings: dict[str, Any], tmp: Path,
            **extra: Any) -> dict[str, Any]:
    """Inspect one fixture image and return the report written to the output."""
    result, _ = run(InspectHandler(settings), {"image": {"path": str(images / name)}, **extra},
                    tmp, Path(settings["output_dir"]))
    assert result.output_file
    report: dict[str, Any] = json.loads(Path(result.output_file).read_text())
    return report


def profile(images: Path, name: str, settings: dict[str, Any], tmp: Path,
            **options: Any) -> dict[str, Any]:
    """Profile one fixture image with all three profiles; return the result data."""
    data = {"image": {"path": str(images / name)}, "profiles": ALL_PROFILES, "options": options}
    result, _ = run(ProfileHandler(settings), data, tmp, Path(settings["output_dir"]))
    assert isinstance(result.data, dict)
    return result.data


def skip_without_lvm(images: Path) -> None:
    """Skip, saying why, when mkimages.sh could not build the LVM image."""
    skipped = images / "SKIPPED-lvm.txt"
    if skipped.exists():
        pytest.skip(f"LVM image not built: {skipped.read_text().strip()}")


# ---------------------------------------------------------------- inspect

DEBIAN_LAYOUTS = {
    "deb-gpt.raw": ("raw", [("gpt", "vfat", "EFI"), ("gpt", "ext4", "rootfs")]),
    "deb-gpt.qcow2": ("qcow2", [("gpt", "vfat", "EFI"), ("gpt", "ext4", "rootfs")]),
    "deb-mbr.qcow2": ("qcow2", [("mbr", "ext4", "boot"), ("mbr", "ext4", "rootfs")]),
    "deb-mbr.vmdk": ("vmdk", [("mbr", "ext4", "boot"), ("mbr", "ext4", "rootfs")]),
}


@pytest.mark.parametrize("name", sorted(DEBIAN_LAYOUTS))
def test_inspect_reports_the_planted_debian_guest(
        name: str, images: Path, settings: dict[str, Any], tmp_path: Path, warm: None) -> None:
    fmt, layout = DEBIAN_LAYOUTS[name]
    report = inspect(images, name, settings, tmp_path)
    assert report["image"]["format"] == fmt
    assert report["image"]["virtual_size"] == 128 * MiB
    assert report["image"]["compressed"] is (True if name == "deb-mbr.qcow2" else
                                              False if fmt == "qcow2" else None)
    parts = [(p["table"], p["filesystem"], p["label"]) for p in report["partitions"]]
    assert parts == layout
    _assert_weak_debian(report, "debvm01")


def test_inspect_reads_lvm_logical_volumes(images: Path, settings: dict[str, Any],
                                           tmp_path: Path, warm: None) -> None:
    skip_without_lvm(images)
    report = inspect(images, "lvm.qcow2", settings, tmp_path)
    lvs = {p["name"]: p for p in report["partitions"] if p["kind"] == "logical_volume"}
    assert set(lvs) == {"vgfix-root", "vgfix-swap"}
    assert (lvs["vgfix-root"]["filesystem"], lvs["vgfix-root"]["label"]) == ("ext4", "lvroot")
    assert [p["type"] for p in report["partitions"] if p["kind"] == "partition"] == ["0x83", "0x8e"]
    _assert_weak_debian(report, "lvmvm01")


def _assert_weak_debian(report: dict[str, Any], hostname: str) -> None:
    """What mkimages.sh planted in every weak Debian tree."""
    osi = report["operating_system"]
    assert (osi["type"], osi["distribution"], osi["version"], osi["major_version"]) == \
        ("linux", "debian", "12.5", 12)
    assert (osi["product_name"], osi["hostname"]) == ("Debian GNU/Linux 12 (bookworm)", hostname)
    assert (osi["arch"], osi["package_format"]) == ("x86_64", "deb")
    accounts = {a["name"]: a for a in report["users"]["accounts"]}
    assert {n for n, a in accounts.items() if a["login"]} == {"root", "alice", "bob"}
    assert accounts["daemon"]["system"] and not accounts["alice"]["system"]
    assert (accounts["bob"]["password"], accounts["alice"]["password"]) == ("empty", "set")
    assert accounts["alice"]["admin"] and not accounts["bob"]["admin"]
    pkgs = {p["name"]: p["version"] for p in report["packages"]["packages"]}
    assert report["packages"]["manager"] == "deb"
    assert pkgs["openssh-server"] == "1:9.2p1-2+deb12u2" and "telnetd" in pkgs
    assert "nis" not in pkgs  # removed, config files only
    assert len(pkgs) == 9
    assert {"ssh.service", "cron.service", "telnet.socket"} <= set(report["services"]["enabled"])
    net = report["network"]
    assert (net["dns_servers"], net["gateway"]) == (["192.0.2.53", "192.0.2.54"], "192.0.2.1")
    ssh = report["security"]["ssh"]
    assert (ssh["permit_root_login"], ssh["password_authentication"]) == ("yes", "yes")
    assert "selinux" not in report["security"]
    assert report["security"]["firewall"]["any_enabled"] is False
    assert report["storage"]["mountpoints"]["/boot/efi"] == "UUID=1234-5678"
    assert report["machine_id"] == "3f1c0e6a9b2d4c5e8f7a6b5c4d3e2f10"
    assert report["cloud_init"] == {"present": True, "enabled": True,
                                    "datasources": ["NoCloud", "None"]}
    assert report["vm_tools"]["detected"] == ["qemu-guest-agent"]
    assert report["kernels"]["installed"] == ["6.1.0-18-amd64"]


def test_inspect_rocky_on_xfs_lists_rpm_packages_from_sqlite(
        images: Path, settings: dict[str, Any], tmp_path: Path, warm: None) -> None:
    report = inspect(images, "rocky-xfs.qcow2", settings, tmp_path)
    osi = report["operating_system"]
    assert (osi["distribution"], osi["version"], osi["minor_version"]) == ("rocky", "9.3", 3)
    assert (osi["hostname"], osi["package_format"], osi["arch"]) == \
        ("rockyvm01.example.com", "rpm", "x86_64")
    pkgs = {p["name"]: p["version"] for p in report["packages"]["packages"]}
    assert pkgs == {"bash": "5.1.8-6.el9_1", "openssh-server": "8.7p1-34.el9",
                    "kernel-core": "5.14.0-362.8.1.el9_3", "firewalld": "1.2.5-2.el9",
                    "selinux-policy-targeted": "38.1.23-1.el9"}
    assert [(p["filesystem"], p["label"]) for p in report["partitions"]] == \
        [("vfat", "EFI"), ("xfs", "root")]
    sec = report["security"]
    assert (sec["selinux"]["mode"], sec["selinux"]["policy"]) == ("permissive", "targeted")
    assert sec["firewall"]["firewalld"] == {"present": True, "enabled": True}
    assert (report["network"]["gateway"], report["network"]["dns_servers"]) == \
        ("203.0.113.1", ["203.0.113.53"])
    assert {a["name"] for a in report["users"]["accounts"] if a["login"]} == {"root", "carol"}


def test_inspect_follows_sshd_includes_and_netplan(
        images: Path, settings: dict[str, Any], tmp_path: Path, warm: None) -> None:
    report = inspect(images, "clean-gpt.qcow2", settings, tmp_path)
    ssh = report["security"]["ssh"]
    assert (ssh["permit_root_login"], ssh["password_authentication"]) == ("no", "no")
    assert report["network"]["gateway"] == "198.51.100.1"
    assert report["network"]["interfaces"][0]["addresses"] == ["198.51.100.10/24"]
    assert report["security"]["firewall"]["nftables"] == {"present": True, "enabled": True}


def test_inspect_without_options_collects_every_section_and_options_select(
        images: Path, settings: dict[str, Any], tmp_path: Path, warm: None) -> None:
    sections = {"partitions", "storage", "packages", "services", "users", "network", "security"}
    full = inspect(images, "deb-gpt.qcow2", settings, tmp_path)
    assert sections <= set(full)
    some = inspect(images, "deb-gpt.qcow2", settings, tmp_path,
                   options={"include_packages": False, "include_network": False})
    assert not {"packages", "network"} & set(some)
    assert sections - {"packages", "network"} <= set(some)


def test_inspect_result_data_is_a_summary_and_progress_rises(
        images: Path, settings: dict[str, Any], tmp_path: Path, warm: None) -> None:
    result, job = run(InspectHandler(settings), {"image": {"path": str(images / "deb-gpt.qcow2")}},
                      tmp_path, Path(settings["output_dir"]))
    data = result.data
    assert data["status"] == "success" and data["output_file"] == result.output_file
    assert Path(result.output_file or "").name == "job-1-inspect.json"
    assert data["inspect"]["packages"]["count"] == 9
    assert data["inspect"]["users"]["login_accounts"] == ["root", "alice", "bob"]
    percents = [p for _, p, _ in job.progress() if p is not None]
    assert percents == sorted(percents) and percents[-1] == 100


def test_inspect_writes_yaml_gzip_to_a_relative_destination(
        images: Path, settings: dict[str, Any], tmp_path: Path, warm: None) -> None:
    output = {"format": "yaml", "destination": "reports/deb.yaml.gz", "compression": "gzip"}
    result, _ = run(InspectHandler(settings),
                    {"image": {"path": str(images / "deb-gpt.qcow2")}, "output": output},
                    tmp_path, Path(settings["output_dir"]))
    assert result.output_file == str(Path(settings["output_dir"]) / "reports" / "deb.yaml.gz")
    text = gzip.decompress(Path(result.output_file).read_bytes()).decode()
    assert "  hostname: debvm01\n" in text
    yaml = pytest.importorskip("yaml", reason="PyYAML absent: YAML checked by text only")
    assert yaml.safe_load(text)["operating_system"]["hostname"] == "debvm01"


def test_inspect_verifies_the_checksum_while_reporting_progress(
        images: Path, settings: dict[str, Any], tmp_path: Path, warm: None) -> None:
    path = images / "deb-mbr.vmdk"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    result, job = run(InspectHandler(settings),
                      {"image": {"path": str(path), "checksum": f"sha256:{digest}"}},
                      tmp_path, Path(settings["output_dir"]))
    assert result.data["inspect"]["image"]["checksum"] == f"sha256:{digest}"
    assert job.progress("checksum")[-1][:2] == ("checksum", 20)
    bad = {"image": {"path": str(path), "checksum": "0" * 64}}
    with pytest.raises(HandlerError, match=f"checksum verification failed for '{path}'"):
        run(InspectHandler(settings), bad, tmp_path, Path(settings["output_dir"]))


def test_inspect_follows_a_backing_chain_inside_the_roots_only(
        images: Path, settings: dict[str, Any], tmp_path: Path, warm: None) -> None:
    overlay = images / "overlay-ok.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    "deb-gpt.qcow2", str(overlay)], check=True)
    report = inspect(images, overlay.name, settings, tmp_path)
    assert report["operating_system"]["hostname"] == "debvm01"
    assert report["image"]["backing_chain"] == [str(images / "deb-gpt.qcow2")]
    outside = tmp_path / "base.qcow2"
    shutil.copy(images / "deb-gpt.qcow2", outside)
    evil = images / "overlay-escape.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(outside), str(evil)], check=True)
    with pytest.raises(HandlerError, match=r"backing file .* resolves outside the allowed image"):
        inspect(images, evil.name, settings, tmp_path)


def test_input_paths_name_the_image_and_its_backing_chain_inside_the_roots(
        images: Path, settings: dict[str, Any], tmp_path: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    "deb-gpt.qcow2", str(images / "overlay-in.qcow2")], check=True)
    handler = ProfileHandler(settings)
    payload = handler.validate({"image": {"path": str(images / "overlay-in.qcow2")},
                                "profiles": ["security"]})
    assert handler.input_paths(payload) == [str(images / "overlay-in.qcow2"),
                                            str(images / "deb-gpt.qcow2")]
    outside = tmp_path / "base.qcow2"
    shutil.copy(images / "clean-gpt.qcow2", outside)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(outside),
                    str(images / "overlay-out.qcow2")], check=True)
    payload = handler.validate({"image": {"path": str(images / "overlay-out.qcow2")},
                                "profiles": ["security"]})
    assert handler.input_paths(payload) == [str(images / "overlay-out.qcow2")]


def test_inspect_and_convert_run_under_landlock_with_only_their_input_paths_readable(
        images: Path, settings: dict[str, Any], tmp_path: Path, warm: None) -> None:
    landlock = pytest.importorskip("worker.landlock", reason="no Landlock layer in this tree")
    from worker.sandbox import readable_runtime

    if not landlock.abi():
        pytest.skip("this kernel has no Landlock")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    "deb-gpt.qcow2", str(images / "overlay-ll.qcow2")], check=True)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the job process, confined as the sandbox confines it
        try:
            os.close(reader)
            job = Job(tmp_path, Path(settings["output_dir"]), "landlocked")
            handler = InspectHandler(settings)
            payload = handler.validate({"image": {"path": str(images / "overlay-ll.qcow2")}})
            landlock.restrict([*readable_runtime(), *handler.input_paths(payload)],
                              [str(job.ctx.workdir), settings["output_dir"], os.devnull],
                              landlock.abi())
            result = handler.execute(job.ctx, payload)
            try:
                (images / "deb-mbr.vmdk").open("rb").close()
                other = "readable"
            except PermissionError:
                other = "denied"
            host = result.data["inspect"]["operating_system"]["hostname"]
            conv = ConvertHandler(settings)
            conv_payload = conv.validate({"image": {"path": str(images / "overlay-ll.qcow2")},
                                          "target": {"format": "qcow2", "name": "ll.qcow2"},
                                          "verify": True})
            assert conv.input_paths(conv_payload) == handler.input_paths(payload)
            verified = conv.execute(job.ctx, conv_payload).data["verified"]
            os.write(writer, json.dumps([host, other, verified]).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as fh:
        answer = fh.read()
    os.waitpid(pid, 0)
    assert json.loads(answer or b"null") == ["debvm01", "denied", True]


# ---------------------------------------------------------------- corrupt and hostile images

@pytest.mark.parametrize(("name", "message"), [
    ("random.img", "is not a disk image this worker can read: no partition table or filesystem"),
    ("truncated.qcow2", "is a truncated or corrupt qcow2 image: .* beyond the end of the file"),
    ("blank-gpt.qcow2", "No operating system found in image '.*blank-gpt.qcow2' \\(filesystems "
                        "found: ext4"),
    ("missing.qcow2", "image '.*missing.qcow2' does not exist"),
])
def test_bad_images_fail_with_a_clear_error_and_later_jobs_still_succeed(
        name: str, message: str, images: Path, settings: dict[str, Any], tmp_path: Path,
        warm: None) -> None:
    handler = InspectHandler(settings)
    data = {"image": {"path": str(images / name)}}
    with pytest.raises(HandlerError, match=message) as err:
        run(handler, data, tmp_path, Path(settings["output_dir"]))
    assert str(images / name) in str(err.value)
    good, _ = run(handler, {"image": {"path": str(images / "deb-gpt.qcow2")}}, tmp_path,
                  Path(settings["output_dir"]), job_id="job-2")
    assert good.data["inspect"]["operating_system"]["hostname"] == "debvm01"


def test_random_bytes_named_qcow2_are_read_by_content_and_a_fifo_is_refused(
        images: Path, settings: dict[str, Any], tmp_path: Path, warm: None) -> None:
    fake = images / "random-named.qcow2"
    shutil.copy(images / "random.img", fake)
    with pytest.raises(HandlerError, match=r"not a disk image .* \(read as raw\)"):
        inspect(images, fake.name, settings, tmp_path)
    fifo = images / "pipe.qcow2"
    os.mkfifo(fifo)
    with pytest.raises(HandlerError, match="is not a regular file"):
        inspect(images, fifo.name, settings, tmp_path)


# ---------------------------------------------------------------- validate: roots and fields

@pytest.mark.parametrize("handler_cls", [InspectHandler, ProfileHandler, ConvertHandler])
def test_validate_rejects_images_outside_the_roots_and_escaping_symlinks(
        handler_cls: type[Any], images: Path, settings: dict[str, Any], tmp_path: Path) -> None:
    extra: dict[str, Any] = {"profiles": ["security"]} if handler_cls is ProfileHandler else \
        {"target": {"format": "raw"}} if handler_cls is ConvertHandler else {}
    handler = handler_cls(settings)
    secret = tmp_path / "secret.img"
    secret.write_bytes(b"x" * 4096)
    link = images / f"escape-{handler_cls.__name__}.qcow2"
    link.symlink_to(secret)
    for path, expect in [
        ("/etc/passwd", "'/etc/passwd' resolves outside the allowed image roots"),
        (str(link), f"resolves outside the allowed image roots .*resolves to '{secret}'"),
        (f"{images}/../{tmp_path.name}/secret.img", "resolves outside the allowed image roots"),
        ("deb-gpt.qcow2", "'deb-gpt.qcow2' must be an absolute path"),
    ]:
        with pytest.raises(HandlerError, match=f"^payload.data.image.path: .*{expect}"):
            handler.validate({"image": {"path": path}, **extra})
    handler.validate({"image": {"path": str(images / "deb-gpt.qcow2")}, **extra})


def test_validate_rejects_outputs_outside_the_output_dir(
        images: Path, settings: dict[str, Any], tmp_path: Path, outdir: Path) -> None:
    image = {"path": str(images / "deb-gpt.qcow2")}
    (outdir / "escape").symlink_to(tmp_path)
    for dest in ("/tmp/inspect-result.json", "../x.json", "escape/x.json"):
        with pytest.raises(HandlerError, match=r"output\.destination: .* resolves outside the "
                                               r"output directory"):
            InspectHandler(settings).validate({"image": image, "output": {"destination": dest}})
    with pytest.raises(HandlerError, match=r"target\.path: .* resolves outside the output"):
        ConvertHandler(settings).validate({"image": image, "target": {"format": "raw",
                                                                      "path": "/etc/x.raw"}})


def test_validate_rejects_bad_fields_naming_them(images: Path, settings: dict[str, Any]) -> None:
    image = {"path": str(images / "deb-gpt.qcow2")}
    with pytest.raises(HandlerError, match=r"image\.checksum: unsupported checksum algorithm 'md5'"):
        InspectHandler(settings).validate({"image": {**image, "checksum": "md5:" + "0" * 32}})
    with pytest.raises(HandlerError, match=re.escape("'sha256:abc123...' is not a valid sha256 digest")):
        InspectHandler(settings).validate({"image": {**image, "checksum": "sha256:abc123..."}})
    cases: list[tuple[Any, dict[str, Any], str]] = [
        (InspectHandler, {"image": {**image, "format": "iso"}}, "unsupported image format 'iso'"),
        (ProfileHandler, {"image": image, "profiles": ["security", "performance"]},
         "profiles\\[1\\] 'performance' is not supported"),
        (ProfileHandler, {"image": image, "profiles": []}, "at least one profile"),
        (ProfileHandler, {"image": image, "profiles": ["security"],
                          "options": {"severity_threshold": "urgent"}}, "unknown severity"),
        (ConvertHandler, {"image": image, "target": {"format": "iso"}}, "unsupported target"),
        (ConvertHandler, {"image": image, "target": {"format": "raw"}, "compress": True},
         "compress is only supported for the qcow2"),
        (ConvertHandler, {"image": image}, "target is required"),
    ]
    for cls, data, message in cases:
        with pytest.raises(ValidationError, match=message):
            cls(settings).validate(data)


def test_every_shared_example_job_gets_a_specific_validation_error(
        images: Path, settings: dict[str, Any]) -> None:
    if not EXAMPLES.is_dir():
        pytest.skip(f"no example jobs at {EXAMPLES}")
    handlers = {"guestkit.inspect": InspectHandler, "guestkit.profile": ProfileHandler}
    seen = 0
    for path in sorted(EXAMPLES.glob("*.json")):
        doc = json.loads(path.read_text())
        if doc["operation"] not in handlers:
            continue
        seen += 1
        with pytest.raises((HandlerError, ValidationError)) as err:
            handlers[doc["operation"]](settings).validate(doc["payload"]["data"])
        assert "payload.data.image" in str(err.value), path.name
        assert doc["payload"]["data"]["image"]["path"].split("/")[-1] in str(err.value) or \
            "checksum" in str(err.value), path.name
    assert seen == 6


# ---------------------------------------------------------------- profile

def test_profile_finds_every_planted_weakness(images: Path, settings: dict[str, Any],
                                              tmp_path: Path, warm: None) -> None:
    data = profile(images, "deb-gpt.qcow2", settings, tmp_path)
    found = {f["id"]: f for f in data["findings"]}
    assert set(found) == WEAK_FINDINGS
    assert found["CIS-AUTH-001"]["severity"] == "critical"
    assert found["CIS-AUTH-001"]["affected"] == ["bob"]
    assert found["CIS-FS-001"]["affected"] == ["/srv/share/drop.txt"]
    assert found["CIS-FS-002"]["affected"] == ["/srv/share/upload"]
    assert found["CIS-FS-003"]["affected"] == ["/opt/report/bin/report (setgid)",
                                               "/usr/local/bin/suidtool (setuid)"]
    assert found["CIS-SVC-001"]["affected"] == ["telnet.socket (Telnet, systemd)"]
    for f in data["findings"]:
        assert f["title"] and f["description"] and f["remediation"] and f["references"]
    assert data["summary"]["by_severity"] == {"critical": 1, "high": 2, "medium": 6, "low": 1,
                                              "info": 0}
    assert data["files_scanned"] > 50


def test_profile_finds_nothing_on_the_hardened_tree(images: Path, settings: dict[str, Any],
                                                     tmp_path: Path, warm: None) -> None:
    data = profile(images, "clean-gpt.qcow2", settings, tmp_path)
    assert data["findings"] == [] and data["summary"]["total_findings"] == 0
    assert data["files_scanned"] > 40  # the walk ran: the clean result is not an empty scan


def test_profile_flags_selinux_only_where_the_distribution_uses_it(
        images: Path, settings: dict[str, Any], tmp_path: Path, warm: None) -> None:
    rocky = profile(images, "rocky-xfs.qcow2", settings, tmp_path)
    assert {f["id"] for f in rocky["findings"]} == {"CIS-MAC-002", "CIS-PWD-001", "CIS-PWD-002"}
    debian = profile(images, "deb-gpt.qcow2", settings, tmp_path)
    assert not [f for f in debian["findings"] if f["id"].startswith("CIS-MAC")]


def test_profile_runs_no_linux_checks_on_a_windows_guest(
        images: Path, settings: dict[str, Any], tmp_path: Path, warm: None) -> None:
    disk = images / "windows-like.raw"
    subprocess.run(["truncate", "-s", "64M", str(disk)], check=True)
    subprocess.run(["mkfs.vfat", "-F", "16", "-n", "WIN", str(disk)], check=True,
                   capture_output=True)
    subprocess.run(["mmd", "-i", str(disk), "::/Windows", "::/Windows/System32"], check=True)
    assert inspect(images, disk.name, settings, tmp_path)["operating_system"]["type"] == "windows"
    data = profile(images, disk.name, settings, tmp_path)
    assert data["findings"] == [] and data["files_scanned"] is None
    assert "the profile checks cover Linux guests; this guest is windows" in data["warnings"][-1]


def test_profile_honours_the_severity_threshold(images: Path, settings: dict[str, Any],
                                                tmp_path: Path, warm: None) -> None:
    data = profile(images, "deb-gpt.qcow2", settings, tmp_path, severity_threshold="high")
    assert {f["severity"] for f in data["findings"]} == {"critical", "high"}
    assert [f["id"] for f in data["findings"]] == ["CIS-AUTH-001", "CIS-SSH-001", "CIS-SVC-001"]
    assert data["summary"]["below_threshold"] == 7


def test_profile_fail_on_critical_fails_the_job_but_writes_the_report(
        images: Path, settings: dict[str, Any], tmp_path: Path, warm: None) -> None:
    dest = Path(settings["output_dir"]) / "db-01-security-profile.json"
    data = {"image": {"path": str(images / "deb-gpt.qcow2")}, "profiles": ALL_PROFILES,
            "options": {"fail_on_critical": True}, "output": {"destination": str(dest)}}
    with pytest.raises(HandlerError, match=r"1 critical finding.*CIS-AUTH-001 Accounts with an "
                                           r"empty password \(bob\).*written to"):
        run(ProfileHandler(settings), data, tmp_path, Path(settings["output_dir"]))
    report = json.loads(dest.read_text())
    assert {f["id"] for f in report["findings"]} == WEAK_FINDINGS
    clean = {**data, "image": {"path": str(images / "clean-gpt.qcow2")}}
    run(ProfileHandler(settings), clean, tmp_path, Path(settings["output_dir"]))


def test_profile_opens_the_image_once_for_all_profiles(
        images: Path, settings: dict[str, Any], tmp_path: Path, warm: None) -> None:
    data = {"image": {"path": str(images / "deb-gpt.qcow2")}, "profiles": ALL_PROFILES}
    _, job = run(ProfileHandler(settings), data, tmp_path, Path(settings["output_dir"]))
    opening = [m for _, _, m in job.progress() if m.startswith("opening")]
    assert opening == ["opening deb-gpt.qcow2"]
    assert [ph for ph, _, _ in job.progress() if ph in ALL_PROFILES] == ALL_PROFILES


# ---------------------------------------------------------------- convert

@pytest.mark.parametrize(("fmt", "compress"), [("qcow2", True), ("raw", False), ("vmdk", False),
                                               ("vdi", False), ("vhdx", False), ("vhd", False)])
def test_convert_round_trips_and_the_result_inspects_the_same(
        fmt: str, compress: bool, images: Path, settings: dict[str, Any], tmp_path: Path,
        warm: None) -> None:
    source = images / "deb-gpt.qcow2"
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    data = {"image": {"path": str(source), "format": "qcow2"}, "target": {"format": fmt},
            "compress": compress}
    result, job = run(ConvertHandler(settings), data, tmp_path, Path(settings["output_dir"]))
    out = Path(result.output_file or "")
    qemu_fmt = {"vhd": "vpc"}.get(fmt, fmt)
    assert out == Path(settings["output_dir"]) / f"deb-gpt.{fmt}"
    cmp = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", qemu_fmt, str(source),
                          str(out)], capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    assert job.progress("convert") and job.progress()[-1][:2] == ("complete", 100)
    assert not list(out.parent.glob(".*partial"))
    roots = {**settings, "image_roots": [settings["output_dir"]]}
    report = inspect(out.parent, out.name, roots, tmp_path)
    assert report["image"]["format"] == fmt
    assert report["operating_system"]["hostname"] == "debvm01"


def test_convert_never_writes_over_the_source_or_its_backing_files(
        images: Path, tmp_path: Path) -> None:
    same = {"image_roots": [str(images)], "output_dir": str(images)}
    handler = ConvertHandler(same)
    with pytest.raises(HandlerError, match=r"target\.path: .* is the source image"):
        handler.validate({"image": {"path": str(images / "deb-gpt.qcow2")},
                          "target": {"format": "qcow2", "path": str(images / "deb-gpt.qcow2")}})
    with pytest.raises(HandlerError, match=r"target\.name: .* is the source image"):
        handler.validate({"image": {"path": str(images / "deb-gpt.raw")},
                          "target": {"format": "raw"}})
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    "deb-gpt.qcow2", str(images / "overlay-conv.qcow2")], check=True)
    base = images / "deb-gpt.qcow2"
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    data = {"image": {"path": str(images / "overlay-conv.qcow2")},
            "target": {"format": "qcow2", "name": "deb-gpt.qcow2"}}
    with pytest.raises(HandlerError, match="is the source image or one of its backing files"):
        run(handler, data, tmp_path, images)
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before


def test_convert_accepts_the_original_payload_shape(images: Path, settings: dict[str, Any],
                                                    tmp_path: Path) -> None:
    data = {"image": {"path": str(images / "deb-mbr.vmdk"), "format": "vmdk"},
            "target_format": "qcow2", "compression": True}
    result, _ = run(ConvertHandler(settings), data, tmp_path, Path(settings["output_dir"]))
    assert result.data["target_format"] == "qcow2" and result.data["compressed"] is True
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", result.output_file or ""],
                                     capture_output=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 128 * MiB


def test_convert_rejects_a_truncated_source_before_running_qemu_img(
        images: Path, settings: dict[str, Any], tmp_path: Path) -> None:
    data = {"image": {"path": str(images / "truncated.qcow2")}, "target": {"format": "raw"}}
    with pytest.raises(HandlerError, match="truncated or corrupt qcow2"):
        run(ConvertHandler(settings), data, tmp_path, Path(settings["output_dir"]))
    assert not list(Path(settings["output_dir"]).iterdir())


def test_convert_to_raw_past_the_file_size_limit_fails_up_front(
        images: Path, settings: dict[str, Any], tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * MiB, hard))
    try:
        data = {"image": {"path": str(images / "deb-gpt.qcow2")}, "target": {"format": "raw"}}
        with pytest.raises(HandlerError, match=r"is 134217728 bytes but this job may write files "
                                               r"of at most 67108864 bytes \(max_file_size_mb\)"):
            run(ConvertHandler(settings), data, tmp_path, Path(settings["output_dir"]))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not list(Path(settings["output_dir"]).iterdir())


@pytest.mark.slow
def test_convert_qemu_img_shares_the_job_process_group_and_dies_with_it(
        settings: dict[str, Any], tmp_path: Path) -> None:
    images = Path(settings["image_roots"][0])
    big = images / "noise.raw"
    with open(big, "wb") as fh:
        for _ in range(192):
            fh.write(os.urandom(MiB))
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the job process
        os.close(reader)
        try:
            os.setpgid(0, 0)
            ctx = Context(job_id="kill-me", operation="guestkit.convert", attempt=1,
                          workdir=tmp_path, output_dir=Path(settings["output_dir"]), limits={},
                          settings={}, send=lambda m: _signal_convert(writer, m))
            handler = ConvertHandler(settings)
            handler.execute(ctx, handler.validate(
                {"image": {"path": str(big)}, "target": {"format": "qcow2"}, "compress": True}))
        finally:
            os._exit(0)
    os.close(writer)
    try:
        assert os.read(reader, 1) == b"p"  # qemu-img has started
        qemu = _wait_for_child(pid, "qemu-img")
        assert os.getpgid(qemu) == pid  # same process group as the job
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert _gone(qemu), "qemu-img outlived its job"
        assert not (Path(settings["output_dir"]) / "noise.qcow2").exists()
    finally:
        os.close(reader)
        big.unlink()


def _signal_convert(fd: int, message: dict[str, Any]) -> None:
    """Tell the test process once qemu-img reports progress."""
    if message.get("phase") == "convert":
        os.write(fd, b"p")


def _children(pid: int) -> Iterator[tuple[int, str]]:
    """(pid, name) of the direct children of `pid`, read from /proc."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat_line = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            name, rest = stat_line[stat_line.index("(") + 1:stat_line.rindex(")")], \
                stat_line[stat_line.rindex(")") + 2:].split()
            if int(rest[1]) == pid:
                yield int(entry), name


def _wait_for_child(pid: int, name: str, timeout: float = 10.0) -> int:
    """The pid of the first child of `pid` named `name`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for child, child_name in _children(pid):
            if child_name == name:
                return child
        time.sleep(0.01)
    raise AssertionError(f"no {name} child of {pid}")


def _gone(pid: int, timeout: float = 5.0) -> bool:
    """Whether `pid` exits (or is a zombie) within `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


# ---------------------------------------------------------------- warm-up

@pytest.mark.slow
def test_prepare_leaves_nothing_to_import_when_jobs_run(images: Path, dissect_ready: None) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from handlers.base import Context\n"
        "from handlers.guestkit_inspect import InspectHandler\n"
        "from handlers.guestkit_profile import ProfileHandler\n"
        f"images, out = Path({str(images)!r}), Path(sys.argv[1])\n"
        "settings = {'image_roots': [str(images)], 'output_dir': str(out)}\n"
        "ctx = Context(job_id='w', operation='x', attempt=1, workdir=out, output_dir=out,\n"
        "              limits={}, settings={}, send=lambda m: None)\n"
        "InspectHandler(settings).prepare()\n"
        "before = set(sys.modules)\n"
        "h = InspectHandler(settings)\n"
        "h.execute(ctx, h.validate({'image': {'path': str(images / 'rocky-xfs.qcow2')}}))\n"
        "h = ProfileHandler(settings)\n"
        "h.execute(ctx, h.validate({'image': {'path': str(images / 'deb-gpt.qcow2')},\n"
        "                           'profiles': ['security', 'compliance', 'hardening']}))\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    out = images / "warm-out"
    out.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True,
                          text=True, cwd=ROOT, check=True)
    assert proc.stdout == "[]\n"  # an inspect and a profile imported nothing prepare() had not


@pytest.mark.timeout(120, method="thread")
def test_the_file_walk_enters_a_directory_linked_into_itself_once(tmp_path: Path) -> None:
    """A crafted ext4: /srv/a holds a hard link to itself (mkfs and fsck never make one), and
    a file whose name is not UTF-8."""
    from dissect.target.filesystems.extfs import ExtFilesystem

    from handlers.guestkit_image import _MAX_WALK_DEPTH, _scan_tree

    src = os.fsencode(tmp_path / "tree")
    os.makedirs(src + b"/srv/a")
    with open(src + b"/srv/ww-\xfe", "wb"):
        pass
    image = tmp_path / "crafted.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", os.fsdecode(src), str(image), "8M"],
                   check=True)
    subprocess.run(["debugfs", "-w", "-R", "link /srv/a /srv/a/loop", str(image)], check=True,
                   capture_output=True)
    with image.open("rb") as fh:
        fs = ExtFilesystem(fh)
        walked = [path for path, _ in _scan_tree("", fs.get("/"), {}, by_inode=True)]
        # where inodes cannot tell directories apart (btrfs), the depth cap ends the walk
        deep = [path for path, _ in _scan_tree("", fs.get("/"), {}, by_inode=False)]
    assert sorted(walked) == ["/lost+found", "/srv", "/srv/a", "/srv/a/loop", "/srv/ww-\ufffd"]
    assert max(path.count("/loop") for path in deep) == _MAX_WALK_DEPTH - 1


def _looping_guest(tmp_path: Path, looped: str) -> tuple[Path, dict[str, Any]]:
    """A small Debian-like ext4 guest whose `looped` file is a symlink to itself; its settings."""
    src = tmp_path / "tree"
    for d in ("etc", "usr/bin", "usr/sbin", "usr/lib", "var/lib/dpkg", "var/log", "tmp", "root"):
        (src / d).mkdir(parents=True)
    (src / looped.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    (src / "etc/os-release").write_text('ID=debian\nVERSION_ID="12"\n')
    (src / "etc/fstab").write_text("/dev/vda1 / ext4 defaults 0 1\n")
    for name, text in (("passwd", "root:x:0:0::/root:/bin/bash\n"), ("hostname", "loopy\n")):
        if f"/etc/{name}" != looped:
            (src / "etc" / name).write_text(text)
    (src / looped.lstrip("/")).symlink_to(looped)
    image = tmp_path / "images" / "loop.img"
    image.parent.mkdir()
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(src), str(image), "8M"], check=True)
    (tmp_path / "out").mkdir()
    return image, {"image_roots": [str(image.parent)], "output_dir": str(tmp_path / "out")}


def test_a_symlink_loop_the_library_trips_on_is_blamed_on_the_guest_not_the_format(
        tmp_path: Path, dissect_ready: None) -> None:
    image, settings = _looping_guest(tmp_path, "/etc/hostname")  # read while the OS is detected
    with pytest.raises(HandlerError) as err:
        run(InspectHandler(settings), {"image": {"path": str(image)}}, tmp_path, tmp_path / "out")
    assert str(err.value).startswith(f"image '{image}': its volumes or the guest's files could "
                                      "not be read (a corrupt or crafted filesystem?): "), err.value
    assert "Symlink" in str(err.value)


def test_a_symlink_loop_where_a_file_is_read_is_a_warning_that_says_so(
        tmp_path: Path, dissect_ready: None) -> None:
    image, settings = _looping_guest(tmp_path, "/etc/passwd")
    result, _ = run(InspectHandler(settings), {"image": {"path": str(image)}}, tmp_path,
                    tmp_path / "out")
    report = json.loads(Path(result.output_file).read_text())
    assert [w for w in report["warnings"]
            if w.startswith("cannot read /etc/passwd: SymlinkRecursionError")], report["warnings"]


def test_a_file_name_that_is_not_utf8_in_a_warning_still_makes_a_report(
        tmp_path: Path, dissect_ready: None) -> None:
    """A symlink loop named with a byte that is not UTF-8 is warned about by its name: the
    report and the job's result must still encode (U+FFFD for the byte)."""
    image, settings = _looping_guest(tmp_path, "/etc/netplan/x\udcff.yaml")
    result, _ = run(InspectHandler(settings), {"image": {"path": str(image)}}, tmp_path,
                    tmp_path / "out")
    warnings = json.loads(Path(result.output_file).read_text())["warnings"]
    assert [w for w in warnings if w.startswith("cannot read /etc/netplan/x\ufffd.yaml: "
                                                  "SymlinkRecursionError")], warnings
    assert orjson.dumps(result.data)  # what the worker writes the job's result with
