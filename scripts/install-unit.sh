#!/usr/bin/env bash
# Install guestkit-worker's systemd units, sysusers.d and tmpfiles.d snippets for a worker
# installed with pip. Safe to run again: files that are already right are left alone.
#
#   sudo scripts/install-unit.sh               # then: systemctl enable --now guestkit-worker
#   sudo scripts/install-unit.sh --dry-run     # say what would change, change nothing
#
# Options:
#   --bin PATH     the guestkit-worker to run (default: `command -v guestkit-worker`)
#   --prefix DIR   where the snippets go (default /usr/local/lib: systemd/system, sysusers.d,
#                  tmpfiles.d below it, all on systemd's search paths)
#   --root DIR     install into the file system tree at DIR (an image, a test) instead of /:
#                  sysusers/tmpfiles are applied with --root, systemd is not reloaded
#   --dry-run      print what would be done
#
# The units say ExecStart=/usr/local/bin/guestkit-worker; any other --bin is written in
# instead. When the program or its interpreter lives under /home, /root or /run/user (a venv or
# pyenv in a home directory), the units' ProtectHome=yes would hide it, so a drop-in relaxes
# that to read-only and says so. systemd-sysusers and systemd-tmpfiles run when present (they
# need no running systemd); `systemctl daemon-reload` runs only when systemd is running.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=$here/../systemd
default_bin=/usr/local/bin/guestkit-worker
bin="" prefix=/usr/local/lib root="" dry_run=0

die() { echo "install-unit: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case $1 in
        --bin) bin=${2:?--bin needs a path}; shift 2 ;;
        --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
        --root) root=${2:?--root needs a directory}; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

if [ -z "$bin" ]; then
    bin=$(command -v guestkit-worker) || die "guestkit-worker is not on PATH; pip install it or pass --bin"
fi
case $bin in /*) ;; *) bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin") ;; esac
[ -x "$bin" ] || die "$bin is not an executable file"
case $bin in *[[:space:]%\\]*) die "$bin: a path with blanks, % or \\ cannot go in ExecStart" ;; esac
[ -z "$root" ] || root=$(cd "$root" && pwd) || die "--root $root does not exist"

unit_dir=$root$prefix/systemd/system
sysusers=$root$prefix/sysusers.d/guestkit-worker.conf
tmpfiles=$root$prefix/tmpfiles.d/guestkit-worker.conf

# Write $2 (content on stdin) with mode $3 unless it already holds exactly that.
put() {
    local dest=$1 mode=$2 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then
        echo "unchanged  $dest"
    elif [ "$dry_run" = 1 ]; then
        echo "would write $dest"
    else
        mkdir -p "$(dirname "$dest")"
        chmod "$mode" "$tmp"
        mv -f "$tmp" "$dest"
        echo "installed  $dest"
        return 0
    fi
    rm -f "$tmp"
}

# The unit text with ExecStart pointing at $bin.
unit_text() {
    local escaped
    escaped=$(printf '%s' "$bin" | sed 's/[&|]/\\&/g')
    sed "s|^ExecStart=$default_bin |ExecStart=$escaped |" "$1"
}

# True when the program or the interpreter on its #! line resolves into a home directory.
lives_in_home() {
    local path interp
    for path in "$bin" "$(head -c 256 "$bin" | sed -n '1s/^#![[:space:]]*\([^[:space:]]*\).*/\1/p')"; do
        [ -n "$path" ] || continue
        interp=$(realpath -m "$path")
        case $interp in /home/*|/root/*|/run/user/*) return 0 ;; esac
    done
    return 1
}

run() {
    if [ "$dry_run" = 1 ]; then echo "would run  $*"; else echo "running    $*"; "$@"; fi
}

for unit in guestkit-worker.service guestkit-worker@.service; do
    unit_text "$src/$unit" | put "$unit_dir/$unit" 0644
    if lives_in_home; then
        printf '%s\n' \
            "# Written by install-unit.sh: $bin (or its interpreter) lives in a home" \
            "# directory, which ProtectHome=yes would hide. Move the worker out of /home and" \
            "# /root (e.g. a venv in /opt) and delete this file to get ProtectHome=yes back." \
            "[Service]" "ProtectHome=read-only" | put "$unit_dir/$unit.d/10-home.conf" 0644
    fi
done
put "$sysusers" 0644 <"$src/guestkit-worker.sysusers.conf"
put "$tmpfiles" 0644 <"$src/guestkit-worker.tmpfiles.conf"

if [ -n "$root" ]; then
    [ "$dry_run" = 1 ] || mkdir -p "$root/etc"
    root_flag=(--root="$root")
else
    root_flag=()
fi
if command -v systemd-sysusers >/dev/null; then
    run systemd-sysusers "${root_flag[@]}" "$sysusers"
else
    echo "skipped    systemd-sysusers (not installed): create the guestkit user by hand" >&2
fi
if command -v systemd-tmpfiles >/dev/null; then
    run systemd-tmpfiles --create "${root_flag[@]}" "$tmpfiles"
else
    echo "skipped    systemd-tmpfiles (not installed): create /var/lib/guestkit-worker by hand" >&2
fi
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    run systemctl daemon-reload
    echo "next: systemctl enable --now guestkit-worker   (or guestkit-worker@POOL)"
else
    echo "skipped    systemctl daemon-reload (systemd is not running here)"
fi
