#!/bin/bash
# Build the guestkit fixture disk images into OUTDIR, without mounts (LVM only with a loop device).
#
# usage: scripts/mkimages.sh OUTDIR
# needs: the Debian packages in scripts/image-packages.txt (this script installs nothing).
#
# images written (assert on parsed content: the images are not byte-reproducible):
#   deb-gpt.raw        GPT: ESP (FAT16) + ext4 root, weak Debian tree "debvm01"       (raw)
#   deb-gpt.qcow2      the same, qcow2
#   deb-mbr.qcow2      MBR: ext4 /boot + ext4 root, weak Debian tree            (compressed qcow2)
#   deb-mbr.vmdk       the same MBR disk, vmdk
#   rocky-xfs.qcow2    GPT: ESP (FAT16) + XFS root, Rocky 9 tree "rockyvm01" with an sqlite rpmdb
#                      (made by rpm --justdb; written directly with Python where rpm is absent)
#   clean-gpt.qcow2    GPT: ext4 root, hardened Debian tree "cleanvm01" (no weaknesses)
#   lvm.qcow2          MBR: ext4 /boot + LVM2 PV (VG vgfix: root, swap), Debian tree "lvmvm01"
#                      (only when a loop device works; otherwise SKIPPED-lvm.txt says why)
#   blank-gpt.qcow2    GPT with one empty ext4: no operating system
#   random.img         random bytes
#   truncated.qcow2    deb-gpt.qcow2 cut short
set -euo pipefail

OUT=${1:?usage: mkimages.sh OUTDIR}
PYTHON=${PYTHON:-python3}
SHADOW_MODE=000; [ "$(id -u)" = 0 ] || SHADOW_MODE=400  # a builder must still read it
SEC=512
export E2FSPROGS_FAKE_TIME=1700000000 LVM_SUPPRESS_FD_WARNINGS=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

for tool in qemu-img sfdisk mkfs.vfat mcopy mke2fs mkfs.xfs "$PYTHON"; do
    command -v "$tool" >/dev/null || { echo "mkimages: missing tool: $tool" >&2; exit 3; }
done

# ---------------------------------------------------------------- tree helpers
put() {  # put FILE [MODE] < content: write a file, creating its directory
    mkdir -p "$(dirname "$1")"
    cat > "$1"
    [ -z "${2:-}" ] || chmod "$2" "$1"
}

enable_unit() {  # enable_unit ROOT TARGET UNIT: systemd "enabled" symlink plus the unit file
    local root=$1 target=$2 unit=$3
    printf '[Unit]\nDescription=%s\n[Install]\nWantedBy=%s\n' "$unit" "$target" \
        | put "$root/usr/lib/systemd/system/$unit"
    mkdir -p "$root/etc/systemd/system/$target.wants"
    ln -sfn "/lib/systemd/system/$unit" "$root/etc/systemd/system/$target.wants/$unit"
}

dpkg_entry() {  # dpkg_entry NAME VERSION [STATUS]: one paragraph of /var/lib/dpkg/status
    printf 'Package: %s\nStatus: %s\nPriority: optional\nArchitecture: amd64\n' \
        "$1" "${3:-install ok installed}"
    printf 'Version: %s\nDescription: fixture package %s\n\n' "$2" "$1"
}

usrmerge() {  # usrmerge ROOT: /bin, /sbin, /lib as links into /usr
    mkdir -p "$1"/usr/{bin,sbin,lib,local/bin}
    ln -sfn usr/bin "$1/bin"; ln -sfn usr/sbin "$1/sbin"; ln -sfn usr/lib "$1/lib"
}

suid_file() {  # suid_file PATH MODE: a small executable with special bits
    printf '#!/bin/sh\nexit 0\n' | put "$1" "$2"
}

debian_base() {  # debian_base ROOT HOSTNAME: what both Debian trees share
    local r=$1
    usrmerge "$r"
    mkdir -p "$r"/{root,tmp,var/tmp,var/log,boot,home,srv,etc/apt}
    chmod 1777 "$r/tmp" "$r/var/tmp"; chmod 700 "$r/root"
    put "$r/usr/lib/os-release" <<'X'
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
X
    ln -sfn ../usr/lib/os-release "$r/etc/os-release"
    echo "12.5" | put "$r/etc/debian_version"
    echo "$2" | put "$r/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$2" | put "$r/etc/hosts"
    suid_file "$r/usr/bin/passwd" 4755
    suid_file "$r/usr/bin/su" 4755
    suid_file "$r/usr/bin/mount" 4755
    suid_file "$r/usr/bin/chage" 2755
    : | put "$r/boot/vmlinuz-6.1.0-18-amd64"
    : | put "$r/boot/initrd.img-6.1.0-18-amd64"
    printf 'loop\nvirtio_net\n' | put "$r/etc/modules"
    mkdir -p "$r/usr/lib/x86_64-linux-gnu"
    : | put "$r/usr/lib/x86_64-linux-gnu/libc.so.6"
}

# ---------------------------------------------------------------- weak Debian
mk_debian_weak() {  # mk_debian_weak ROOT HOSTNAME: a Debian tree with every planted weakness
    local r=$1
    debian_base "$r" "$2"
    put "$r/etc/passwd" <<'X'
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
bin:x:2:2:bin:/bin:/usr/sbin/nologin
www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin
sshd:x:100:65534::/run/sshd:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
alice:x:1000:1000:Alice,,,:/home/alice:/bin/bash
bob:x:1001:1001:Bob:/home/bob:/bin/bash
X
    put "$r/etc/shadow" 640 <<'X'
root:$6$fixture$Jd0Jv2p2c3m8m1tYg0tq5a8cVv7y6wq9bA1B2C3D4E5F6G7H8I9J0kLmNoPqRsTuVwXyZ.:19700:0:99999:7:::
daemon:*:19700:0:99999:7:::
bin:*:19700:0:99999:7:::
www-data:*:19700:0:99999:7:::
sshd:*:19700:0:99999:7:::
nobody:*:19700:0:99999:7:::
alice:$6$fixture$Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0PpOoNnMmLlKkJjIiHhGgFfEeDdCcBbAa0123.:19700:0:99999:7:::
bob::19700:0:99999:7:::
X
    printf 'root:x:0:\nshadow:x:42:\nsudo:x:27:alice\nalice:x:1000:\nbob:x:1001:\n' \
        | put "$r/etc/group"
    mkdir -p "$r/home/alice" "$r/home/bob"
    echo "hello" | put "$r/home/alice/notes.txt"
    put "$r/etc/login.defs" <<'X'
MAIL_DIR        /var/mail
PASS_MAX_DAYS   99999
PASS_MIN_DAYS   0
PASS_WARN_AGE   7
ENCRYPT_METHOD  SHA512
X
    put "$r/etc/ssh/sshd_config" <<'X'
Include /etc/ssh/sshd_config.d/*.conf
Port 22
PermitRootLogin yes
PasswordAuthentication yes
PermitEmptyPasswords no
X11Forwarding yes
X
    {
        dpkg_entry openssh-server 1:9.2p1-2+deb12u2
        dpkg_entry bash 5.2.15-2+b2
        dpkg_entry coreutils 9.1-1
        dpkg_entry libc6 2.36-9+deb12u4
        dpkg_entry systemd 252.22-1~deb12u1
        dpkg_entry linux-image-6.1.0-18-amd64 6.1.76-1
        dpkg_entry telnetd 0.17+2.4-2+deb12u1
        dpkg_entry cloud-init 22.4.2-1
        dpkg_entry qemu-guest-agent 1:7.2+dfsg-7+deb12u5
        dpkg_entry nis 4.17 "deinstall ok config-files"
    } | put "$r/var/lib/dpkg/status"
    enable_unit "$r" multi-user.target ssh.service
    enable_unit "$r" multi-user.target cron.service
    enable_unit "$r" multi-user.target qemu-guest-agent.service
    enable_unit "$r" cloud-init.target cloud-init.service
    enable_unit "$r" sockets.target telnet.socket
    suid_file "$r/usr/bin/qemu-ga" 0755
    printf 'nameserver 192.0.2.53\nnameserver 192.0.2.54\nsearch example.internal\n' \
        | put "$r/etc/resolv.conf"
    put "$r/etc/network/interfaces" <<'X'
auto lo
iface lo inet loopback
auto eth0
iface eth0 inet static
    address 192.0.2.10/24
    gateway 192.0.2.1
X
    put "$r/etc/fstab" <<'X'
# <file system> <mount point> <type> <options> <dump> <pass>
UUID=0b9b5c6e-4d2a-4a0f-9a55-2f4c1b3a0001 /         ext4 errors=remount-ro 0 1
UUID=1234-5678                            /boot/efi vfat umask=0077        0 1
/swapfile                                 none      swap sw                0 0
proc                                      /proc     proc defaults          0 0
X
    echo "3f1c0e6a9b2d4c5e8f7a6b5c4d3e2f10" | put "$r/etc/machine-id"
    printf 'datasource_list: [ NoCloud, None ]\n' | put "$r/etc/cloud/cloud.cfg"
    # planted weaknesses on the filesystem
    echo "anyone may write" | put "$r/srv/share/drop.txt" 666
    mkdir -p "$r/srv/share/upload"; chmod 0777 "$r/srv/share/upload"
    suid_file "$r/usr/local/bin/suidtool" 4755
    suid_file "$r/opt/report/bin/report" 2755
}

# ---------------------------------------------------------------- clean Debian
mk_debian_clean() {  # mk_debian_clean ROOT: a hardened Debian tree that must yield no finding
    local r=$1
    debian_base "$r" cleanvm01
    printf 'root:x:0:0:root:/root:/bin/bash\nsshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n%s\n' \
        'dave:x:1000:1000:Dave:/home/dave:/bin/bash' | put "$r/etc/passwd"
    put "$r/etc/shadow" 640 <<'X'
root:!:19700:1:90:14:::
sshd:*:19700:0:99999:7:::
dave:$6$fixture$Q1w2E3r4T5y6U7i8O9p0AaSsDdFfGgHhJjKkLlZzXxCcVvBbNnMm1234567890abcdef.:19700:1:90:14:::
X
    printf 'root:x:0:\nshadow:x:42:\ndave:x:1000:\n' | put "$r/etc/group"
    mkdir -p "$r/home/dave"
    printf 'PASS_MAX_DAYS   90\nPASS_MIN_DAYS   1\nPASS_WARN_AGE   14\n' | put "$r/etc/login.defs"
    printf 'Include /etc/ssh/sshd_config.d/*.conf\nPort 22\nX11Forwarding no\n' \
        | put "$r/etc/ssh/sshd_config"
    printf 'PermitRootLogin no\nPasswordAuthentication no\nPermitEmptyPasswords no\n' \
        | put "$r/etc/ssh/sshd_config.d/50-hardening.conf"
    {
        dpkg_entry openssh-server 1:9.2p1-2+deb12u2
        dpkg_entry bash 5.2.15-2+b2
        dpkg_entry nftables 1.0.6-2+deb12u2
        dpkg_entry systemd 252.22-1~deb12u1
    } | put "$r/var/lib/dpkg/status"
    enable_unit "$r" multi-user.target ssh.service
    enable_unit "$r" multi-user.target nftables.service
    printf '#!/usr/sbin/nft -f\nflush ruleset\ntable inet filter {\n}\n' | put "$r/etc/nftables.conf"
    echo "nameserver 198.51.100.53" | put "$r/etc/resolv.conf"
    put "$r/etc/netplan/50-cloud-init.yaml" <<'X'
network:
  version: 2
  ethernets:
    eth0:
      addresses: [198.51.100.10/24]
      routes:
        - to: default
          via: 198.51.100.1
X
    echo "UUID=0b9b5c6e-4d2a-4a0f-9a55-2f4c1b3a0003 / ext4 defaults 0 1" | put "$r/etc/fstab"
    echo "9a8b7c6d5e4f30211203f4e5d6c7b8a9" | put "$r/etc/machine-id"
}

# ---------------------------------------------------------------- Rocky
ROCKY_PACKAGES="bash 5.1.8 6.el9_1
openssh-server 8.7p1 34.el9
kernel-core 5.14.0 362.8.1.el9_3
firewalld 1.2.5 2.el9
selinux-policy-targeted 38.1.23 1.el9"

mk_rpmdb() {  # mk_rpmdb ROOT: a real sqlite rpmdb (rpmbuild + rpm --justdb), or written directly
    local r=$1 spec name version release
    if ! command -v rpmbuild >/dev/null || ! command -v rpm >/dev/null; then
        echo "mkimages: rpm/rpmbuild not found: writing the Rocky rpmdb.sqlite directly" >&2
        mk_rpmdb_direct "$r/var/lib/rpm/rpmdb.sqlite"
        return
    fi
    while read -r name version release; do
        spec=$WORK/$name.spec
        printf 'Name: %s\nVersion: %s\nRelease: %s\nSummary: fixture %s\nLicense: MIT\n' \
            "$name" "$version" "$release" "$name" > "$spec"
        printf 'BuildArch: noarch\n%%description\nfixture\n%%files\n' >> "$spec"
        rpmbuild -bb --quiet --define "_topdir $WORK/rpmbuild" "$spec" >/dev/null 2>&1
    done <<< "$ROCKY_PACKAGES"
    rpm --root "$r" --dbpath /var/lib/rpm --initdb
    rpm --root "$r" --dbpath /var/lib/rpm -i --justdb --nodeps --noscripts --ignorearch \
        --ignoreos "$WORK"/rpmbuild/RPMS/noarch/*.rpm 2>/dev/null
    rm -f "$r"/var/lib/rpm/{.rpm.lock,rpmdb.sqlite-shm,rpmdb.sqlite-wal}
}

mk_rpmdb_direct() {  # mk_rpmdb_direct DBFILE: the rpmdb.sqlite rpm would write, from Python
    "$PYTHON" - "$1" "$ROCKY_PACKAGES" <<'X'
import sqlite3, struct, sys

def header(name, version, release):
    tags = [(1000, name), (1001, version), (1002, release), (1004, f"fixture {name}"),
            (1022, "noarch")]
    index, store = b"", b""
    for tag, value in tags:  # STRING (type 6) entries, in tag order as rpm writes them
        index += struct.pack(">iiii", tag, 6, len(store), 1)
        store += value.encode() + b"\0"
    return struct.pack(">II", len(tags), len(store)) + index + store

con = sqlite3.connect(sys.argv[1])
con.execute("PRAGMA journal_mode=WAL")
con.execute("CREATE TABLE 'Packages' (hnum INTEGER PRIMARY KEY AUTOINCREMENT,blob BLOB NOT NULL)")
con.executemany("INSERT INTO Packages (blob) VALUES (?)",
                [(header(*line.split()),) for line in sys.argv[2].splitlines()])
con.commit()
con.close()
X
}

mk_rocky() {  # mk_rocky ROOT: a Rocky Linux 9 tree with a real sqlite rpmdb
    local r=$1
    usrmerge "$r"
    mkdir -p "$r"/{root,home/carol,etc/ssh,var/lib/rpm}
    put "$r/etc/os-release" <<'X'
NAME="Rocky Linux"
VERSION="9.3 (Blue Onyx)"
ID="rocky"
ID_LIKE="rhel centos fedora"
VERSION_ID="9.3"
PLATFORM_ID="platform:el9"
PRETTY_NAME="Rocky Linux 9.3 (Blue Onyx)"
X
    echo "Rocky Linux release 9.3 (Blue Onyx)" | put "$r/etc/redhat-release"
    ln -sfn redhat-release "$r/etc/system-release"
    echo "rockyvm01.example.com" | put "$r/etc/hostname"
    put "$r/etc/passwd" <<'X'
root:x:0:0:root:/root:/bin/bash
bin:x:1:1:bin:/bin:/sbin/nologin
sshd:x:74:74:Privilege-separated SSH:/usr/share/empty.sshd:/sbin/nologin
chrony:x:992:987:chrony system user:/var/lib/chrony:/sbin/nologin
carol:x:1000:1000:Carol:/home/carol:/bin/bash
X
    put "$r/etc/shadow" "$SHADOW_MODE" <<'X'
root:!!:19700:0:99999:7:::
bin:*:19700:0:99999:7:::
sshd:!!:19700::::::
chrony:!!:19700::::::
carol:$6$fixture$Carol0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01.:19700:0:99999:7:::
X
    printf 'PASS_MAX_DAYS\t99999\nPASS_MIN_DAYS\t0\nPASS_WARN_AGE\t7\n' | put "$r/etc/login.defs"
    printf 'PermitRootLogin prohibit-password\nPasswordAuthentication no\n' \
        | put "$r/etc/ssh/sshd_config"
    printf 'SELINUX=permissive\nSELINUXTYPE=targeted\n' | put "$r/etc/selinux/config"
    printf '[main]\nDefaultZone=public\n' | put "$r/etc/firewalld/firewalld.conf"
    enable_unit "$r" multi-user.target sshd.service
    enable_unit "$r" multi-user.target firewalld.service
    enable_unit "$r" multi-user.target chronyd.service
    printf 'nameserver 203.0.113.53\n' | put "$r/etc/resolv.conf"
    put "$r/etc/NetworkManager/system-connections/eth0.nmconnection" 600 <<'X'
[connection]
id=eth0
type=ethernet
interface-name=eth0
[ipv4]
method=manual
address1=203.0.113.20/24,203.0.113.1
dns=203.0.113.53;
X
    echo "UUID=0b9b5c6e-4d2a-4a0f-9a55-2f4c1b3a0002 / xfs defaults 0 0" | put "$r/etc/fstab"
    echo "5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b" | put "$r/etc/machine-id"
    : | put "$r/boot/vmlinuz-5.14.0-362.8.1.el9_3.x86_64"
    mk_rpmdb "$r"
}

mkproto() {  # mkproto ROOT: print an mkfs.xfs protofile that copies the tree ROOT
    "$PYTHON" - "$1" <<'X'
import os, stat, sys

def perm(st):
    m = stat.S_IMODE(st.st_mode)
    return ("u" if m & stat.S_ISUID else "-") + ("g" if m & stat.S_ISGID else "-") + f"{m & 0o777:03o}"

def walk(path, depth):
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        st = os.lstat(p)
        head = f"{'  ' * depth}{name} "
        own = f"{st.st_uid} {st.st_gid}"
        if stat.S_ISLNK(st.st_mode):
            print(f"{head}l{perm(st)} {own} {os.readlink(p)}")
        elif stat.S_ISDIR(st.st_mode):
            print(f"{head}d{perm(st)} {own}")
            walk(p, depth + 1)
            print(f"{'  ' * depth}$")
        elif stat.S_ISREG(st.st_mode):
            print(f"{head}-{perm(st)} {own} {p}")

root = sys.argv[1]
print(f"/dev/null\n0 0\nd{perm(os.stat(root))} 0 0")
walk(root, 1)
print("$")
X
}

# ---------------------------------------------------------------- disks
gpt_table() {  # gpt_table IMG LABEL-ID: ESP p1 (16 MiB at 2048) and root p2 (ROOT_SECTORS at 34816)
    sfdisk --quiet "$1" <<X
label: gpt
label-id: $2
start=2048, size=32768, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI System Partition"
start=34816, size=$ROOT_SECTORS, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root"
X
}

esp_fs() {  # esp_fs IMG VOLID: FAT16 ESP in p1 with a boot loader file
    # --offset makes mkfs.vfat warn that the file is larger than the filesystem: expected
    mkfs.vfat -F 16 -n EFI -i "$2" --offset=2048 "$1" $((32768 / 2)) >/dev/null 2>&1
    mkdir -p "$WORK/esp/EFI/BOOT"
    echo "fixture boot loader" > "$WORK/esp/EFI/BOOT/BOOTX64.EFI"
    mcopy -s -i "$1@@$((2048 * SEC))" "$WORK/esp/EFI" ::/
}

ext4_at() {  # ext4_at IMG START-SECTOR SECTORS LABEL UUID TREE: ext4 written in place
    mke2fs -q -F -t ext4 -L "$4" -U "$5" -E "offset=$(($2 * SEC)),root_owner=0:0" \
        -d "$6" "$1" "$(($3 * SEC / 1024))k"
}

build_deb_gpt() {
    local img=$OUT/deb-gpt.raw
    rm -f "$img"; truncate -s 128M "$img"
    ROOT_SECTORS=204800 gpt_table "$img" 11111111-2222-3333-4444-555555555555
    esp_fs "$img" 12345678
    ext4_at "$img" 34816 204800 rootfs 0b9b5c6e-4d2a-4a0f-9a55-2f4c1b3a0001 "$WORK/deb"
    qemu-img convert -f raw -O qcow2 "$img" "$OUT/deb-gpt.qcow2"
}

build_deb_mbr() {
    local img=$WORK/mbr.raw
    truncate -s 128M "$img"
    printf 'label: dos\nlabel-id: 0xdeadbeef\nstart=2048, size=65536, type=83, bootable\n%s\n' \
        'start=67584, size=190464, type=83' | sfdisk --quiet "$img"
    mkdir -p "$WORK/bootdir/grub"; echo "set timeout=5" > "$WORK/bootdir/grub/grub.cfg"
    ext4_at "$img" 2048 65536 boot 0b9b5c6e-4d2a-4a0f-9a55-2f4c1b3a00b0 "$WORK/bootdir"
    ext4_at "$img" 67584 190464 rootfs 0b9b5c6e-4d2a-4a0f-9a55-2f4c1b3a0001 "$WORK/deb"
    qemu-img convert -f raw -O qcow2 -c "$img" "$OUT/deb-mbr.qcow2"
    qemu-img convert -f raw -O vmdk "$img" "$OUT/deb-mbr.vmdk"
}

build_rocky() {
    local img=$WORK/rocky.raw part=$WORK/xfs.part
    truncate -s 340M "$img"
    ROOT_SECTORS=655360 gpt_table "$img" 22222222-3333-4444-5555-666666666666
    esp_fs "$img" 2222AAAA
    truncate -s $((655360 * SEC)) "$part"
    mkproto "$WORK/rocky" > "$WORK/rocky.proto"
    mkfs.xfs -q -f -L root -m uuid=0b9b5c6e-4d2a-4a0f-9a55-2f4c1b3a0002 \
        -p "$WORK/rocky.proto" "$part"
    dd if="$part" of="$img" bs=1M seek=$((34816 * SEC / 1048576)) conv=notrunc,sparse status=none
    qemu-img convert -f raw -O qcow2 -c "$img" "$OUT/rocky-xfs.qcow2"
}

build_single_ext4() {  # build_single_ext4 NAME TREE UUID: GPT with one ext4 partition
    local img=$WORK/$1.raw
    truncate -s 96M "$img"
    printf 'label: gpt\nstart=2048, size=180224, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n' \
        | sfdisk --quiet "$img"
    ext4_at "$img" 2048 180224 rootfs "$3" "$2"
    qemu-img convert -f raw -O qcow2 "$img" "$OUT/$1.qcow2"
}

loop_usable() {  # loop_usable: succeed when a loop device can be attached here
    [ "$(id -u)" = 0 ] && command -v losetup >/dev/null && command -v pvcreate >/dev/null \
        && [ -e /dev/loop-control ] || return 1
    truncate -s 1M "$WORK/probe"
    local dev
    dev=$(losetup -f --show "$WORK/probe" 2>/dev/null) || return 1
    losetup -d "$dev"
}

build_lvm() {  # MBR: p1 ext4 /boot, p2 LVM PV; VG vgfix with LVs root (ext4) and swap
    local img=$WORK/lvm.raw loop pe_start p2=67584
    truncate -s 96M "$img"
    printf 'label: dos\nstart=2048, size=65536, type=83, bootable\nstart=%s, size=%s, type=8e\n' \
        $p2 126976 | sfdisk --quiet "$img"
    ext4_at "$img" 2048 65536 boot 0b9b5c6e-4d2a-4a0f-9a55-2f4c1b3a00b1 "$WORK/bootdir"
    loop=$(losetup -f --show --offset $((p2 * SEC)) --sizelimit $((126976 * SEC)) "$img")
    (
        trap 'losetup -d "$loop"' EXIT
        local lvm=(--devices "$loop" --config 'backup { backup = 0 archive = 0 }')
        pvcreate "${lvm[@]}" -q -y "$loop" >/dev/null
        vgcreate "${lvm[@]}" -q --driverloaded n vgfix "$loop" >/dev/null
        lvcreate "${lvm[@]}" -q --driverloaded n -an -Zn -y -L 40M -n root vgfix >/dev/null
        lvcreate "${lvm[@]}" -q --driverloaded n -an -Zn -y -L 8M -n swap vgfix >/dev/null
        pvs "${lvm[@]}" --noheadings --units b --nosuffix -o pe_start "$loop" \
            | tr -d ' ' > "$WORK/pe_start"
    ) 2> >(grep -v -e 'WARNING' -e 'driverloaded' >&2)
    pe_start=$(cat "$WORK/pe_start")
    # root is the first LV: one linear segment from physical extent 0
    mke2fs -q -F -t ext4 -L lvroot -E "offset=$((p2 * SEC + pe_start))" -d "$WORK/lvm" \
        "$img" 40M
    qemu-img convert -f raw -O qcow2 -c "$img" "$OUT/lvm.qcow2"
}

build_corrupt() {
    head -c 4M /dev/urandom > "$OUT/random.img"
    local size
    size=$(stat -c %s "$OUT/deb-gpt.qcow2")
    head -c $((size / 3)) "$OUT/deb-gpt.qcow2" > "$OUT/truncated.qcow2"
}

# ---------------------------------------------------------------- main
mk_debian_weak "$WORK/deb" debvm01
mk_debian_weak "$WORK/lvm" lvmvm01
mk_debian_clean "$WORK/clean"
mk_rocky "$WORK/rocky"
mkdir -p "$WORK/empty"
if [ "$(id -u)" = 0 ]; then
    chown -R 1000:1000 "$WORK/deb/home/alice" "$WORK/clean/home/dave" "$WORK/rocky/home/carol"
    chown 1001:1001 "$WORK/deb/home/bob"; chgrp 42 "$WORK/deb/etc/shadow" "$WORK/clean/etc/shadow"
fi

rm -f "$OUT/SKIPPED-lvm.txt" "$OUT/lvm.qcow2"
build_deb_gpt
build_deb_mbr
build_rocky
build_single_ext4 clean-gpt "$WORK/clean" 0b9b5c6e-4d2a-4a0f-9a55-2f4c1b3a0003
build_single_ext4 blank-gpt "$WORK/empty" 0b9b5c6e-4d2a-4a0f-9a55-2f4c1b3a0004
build_corrupt
if loop_usable; then
    build_lvm
else
    echo "no usable loop device (needs root, lvm2 and /dev/loop-control): LVM image not built" \
        | tee "$OUT/SKIPPED-lvm.txt" >&2
fi
ls "$OUT"
