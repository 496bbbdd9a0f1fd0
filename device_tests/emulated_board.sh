#!/usr/bin/env bash
# An emulated ARM64 board (and a native loopback sshd) that the device tests reach over plain ssh.
#
#   device_tests/emulated_board.sh build          # Debian arm64 root under qemu-user-static (cached)
#   device_tests/emulated_board.sh start          # its own sshd on 127.0.0.1:$EDGELM_BOARD_PORT
#   device_tests/emulated_board.sh native-start   # the host's sshd on 127.0.0.1:$EDGELM_NATIVE_PORT
#   device_tests/emulated_board.sh env            # EDGELM_DEVICE=... EDGELM_SSH_CONFIG=... for eval
#   device_tests/emulated_board.sh stop | native-stop | status
#
# The board is a Debian bookworm arm64 root built by debootstrap and entered with chroot; its
# aarch64 binaries run under qemu-user-static through binfmt_misc, so `uname -m` over ssh answers
# aarch64 and a bundle goes through exactly the path a Raspberry Pi takes (ssh, python3, a venv,
# pip wheels for aarch64). Correctness there is real; timings are qemu's, not a device's: the
# board carries /etc/edgelm-emulated and sshd sets EDGELM_EMULATED for every session, and edgelm's
# device bench reports "emulated": true.
#
# Keys are throwaway and private to this script: a client key, the board's host key pinned in a
# known_hosts file, and an ssh config (Host edgelm-board, Host edgelm-native) that callers pass
# with `ssh -F` / `--ssh-config`. Nothing touches ~/.ssh. Needs root (debootstrap, chroot, mounts)
# and the Debian packages debootstrap, qemu-user-static, openssh-server, openssh-client.
#
# Environment (defaults):
#   EDGELM_BOARD_ROOT   /var/cache/edgelm-board/bookworm-arm64  the cached root (reused if complete)
#   EDGELM_BOARD_STATE  /var/tmp/edgelm-board                   keys, ssh config, logs, pid files
#   EDGELM_BOARD_PORT   2222      EDGELM_NATIVE_PORT 2223        loopback ports
#   EDGELM_BOARD_SUITE  bookworm  EDGELM_BOARD_MIRROR http://deb.debian.org/debian
#   EDGELM_BOARD_CPU    cortex-a72 (a Raspberry Pi 4's core; or cortex-a53, cortex-a76): the CPU qemu
#                       emulates in ssh sessions (QEMU_CPU) and the one the board's /proc/cpuinfo shows
set -euo pipefail

ROOT=${EDGELM_BOARD_ROOT:-/var/cache/edgelm-board/bookworm-arm64}
STATE=${EDGELM_BOARD_STATE:-/var/tmp/edgelm-board}
PORT=${EDGELM_BOARD_PORT:-2222}
NATIVE_PORT=${EDGELM_NATIVE_PORT:-2223}
SUITE=${EDGELM_BOARD_SUITE:-bookworm}
MIRROR=${EDGELM_BOARD_MIRROR:-http://deb.debian.org/debian}
BOARD_CPU=${EDGELM_BOARD_CPU:-cortex-a72}
BOARD_USER=edgelm
PACKAGES=python3,python3-venv,python3-pip,openssh-server,ca-certificates
READY=.edgelm-board-ready
SSHD_PID=/run/edgelm-sshd.pid  # inside the root

say() { printf 'emulated_board: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and mounts); run it with sudo"; }

need_tools() {
    local missing=() t
    for t in "$@"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
    [ ${#missing[@]} = 0 ] || die "missing: ${missing[*]}; install with: apt-get install -y debootstrap qemu-user-static openssh-server openssh-client"
}

# Mount points under $1 (so nothing is ever deleted through a bind mount).
mounts_under() { awk -v d="$1/" 'index($2, d) == 1 { print $2 }' /proc/mounts; }

native_host() { [ "$(uname -m)" = aarch64 ]; }

ensure_binfmt() {
    native_host && return 0
    need_tools qemu-aarch64-static
    [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        local conf=/usr/lib/binfmt.d/qemu-aarch64.conf
        [ -f "$conf" ] || die "$conf is missing; install qemu-user-static"
        grep -v '^#' "$conf" | grep -m1 . > /proc/sys/fs/binfmt_misc/register
        say "registered qemu-aarch64 with binfmt_misc"
    fi
    grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "binfmt_misc entry qemu-aarch64 is disabled"
}

# The board reaches the network as the host does: its resolver, its pip.conf, and the host's
# local CA certificates (a TLS-inspecting proxy's CA, say), added to the board's trust store.
sync_network_config() {  # $1: root
    local r=$1 changed=0 f
    cp /etc/resolv.conf "$r/etc/resolv.conf"
    if [ -f /etc/pip.conf ]; then cp /etc/pip.conf "$r/etc/pip.conf"; fi
    if [ -d /usr/local/share/ca-certificates ]; then
        install -d "$r/usr/local/share/ca-certificates"
        for f in /usr/local/share/ca-certificates/*.crt; do
            [ -f "$f" ] || continue
            cmp -s "$f" "$r/usr/local/share/ca-certificates/${f##*/}" && continue
            cp "$f" "$r/usr/local/share/ca-certificates/" && changed=1
        done
    fi
    if [ "$changed" = 1 ]; then
        chroot "$r" update-ca-certificates >/dev/null 2>&1 || say "warning: update-ca-certificates failed in $r"
    fi
    return 0
}

configure_root() {  # $1: a fresh debootstrap root
    local r=$1
    sync_network_config "$r"
    chroot "$r" useradd -m -s /bin/bash "$BOARD_USER"
    chroot "$r" usermod -p '*' "$BOARD_USER"  # no password, but not "locked": sshd (UsePAM no) lets keys in
    chroot "$r" ssh-keygen -A >/dev/null
    if ! native_host; then
        printf 'qemu-user-static aarch64 on an %s host: correctness is real, timings are not device timings\n' \
            "$(uname -m)" > "$r/etc/edgelm-emulated"
    fi
    chroot "$r" apt-get clean
    rm -rf "$r/var/lib/apt/lists/"*
}

cmd_build() {
    need_root
    need_tools debootstrap chroot ssh-keygen
    ensure_binfmt
    if [ -f "$ROOT/$READY" ]; then
        say "reusing the cached root $ROOT (built $(cat "$ROOT/$READY"))"
        return 0
    fi
    local part="$ROOT.partial" t0
    for d in "$ROOT" "$part"; do
        [ -z "$(mounts_under "$d")" ] || die "$d has mounts under it; run '$0 stop' first"
        [ -e "$d" ] && { say "removing the incomplete root $d"; rm -rf --one-file-system "$d"; }
    done
    mkdir -p "$(dirname "$ROOT")"
    t0=$(date +%s)
    say "debootstrap $SUITE arm64 into $part (several minutes)"
    debootstrap --arch=arm64 --variant=minbase --include="$PACKAGES" "$SUITE" "$part" "$MIRROR" >"$part.log" 2>&1 \
        || { tail -20 "$part.log" >&2; die "debootstrap failed (log: $part.log)"; }
    configure_root "$part"
    printf '%s, in %ss\n' "$(date -u +%FT%TZ)" "$(( $(date +%s) - t0 ))" > "$part/$READY"
    mv "$part" "$ROOT"
    mv "$part.log" "$ROOT.debootstrap.log"
    say "built $ROOT in $(( $(date +%s) - t0 ))s ($(du -sm "$ROOT" | cut -f1) MB)"
}

client_key() {
    install -d -m 700 "$STATE"
    [ -f "$STATE/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C edgelm-board-client -f "$STATE/id_ed25519"
    touch "$STATE/known_hosts" && chmod 600 "$STATE/known_hosts"
}

# Pin host key $2 (a .pub file) under alias $1 in our known_hosts.
pin_host_key() {
    local alias=$1 pub=$2 tmp
    tmp=$(mktemp "$STATE/known_hosts.XXXXXX")
    { grep -v "^$alias " "$STATE/known_hosts" || true; printf '%s %s\n' "$alias" "$(cut -d' ' -f1,2 "$pub")"; } > "$tmp"
    chmod 600 "$tmp" && mv "$tmp" "$STATE/known_hosts"
}

write_ssh_config() {
    cat > "$STATE/ssh_config" <<EOF
# Written by device_tests/emulated_board.sh; pass it with ssh -F / edgelm --ssh-config.
Host edgelm-board
    HostName 127.0.0.1
    Port $PORT
    User $BOARD_USER
    HostKeyAlias edgelm-board
Host edgelm-native
    HostName 127.0.0.1
    Port $NATIVE_PORT
    User $(id -un)
    HostKeyAlias edgelm-native
Host *
    IdentityFile $STATE/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile $STATE/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 20
EOF
    chmod 600 "$STATE/ssh_config"
}

wait_ssh() {  # $1: host alias, $2: seconds
    local i
    for ((i = 0; i < $2; i++)); do
        if out=$(ssh -F "$STATE/ssh_config" "$1" uname -m 2>/dev/null); then
            say "$1 is up: uname -m = $out"
            return 0
        fi
        sleep 1
    done
    ssh -F "$STATE/ssh_config" "$1" true || true
    return 1
}

board_pid() {
    local f="$ROOT$SSHD_PID" pid
    [ -f "$f" ] || return 1
    pid=$(cat "$f")
    [ -d "/proc/$pid" ] && [ "$(readlink "/proc/$pid/root")" = "$(readlink -f "$ROOT")" ] && echo "$pid"
}

# An aarch64 /proc/cpuinfo for the board, one entry per host core. Under qemu-user the kernel's
# own /proc/cpuinfo describes the x86 host, and the CPU probes of the runtimes (pytorch/cpuinfo in
# onnxruntime, XNNPACK) crash or complain on it; this file is bind-mounted over it instead.
write_cpuinfo() {  # $1: output file
    local part features n i
    case $BOARD_CPU in
        cortex-a53) part=0xd03; features="fp asimd evtstrm crc32 cpuid" ;;
        cortex-a72) part=0xd08; features="fp asimd evtstrm crc32 cpuid" ;;
        cortex-a76) part=0xd0b; features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
        *) die "EDGELM_BOARD_CPU=$BOARD_CPU: choose cortex-a53, cortex-a72 or cortex-a76" ;;
    esac
    n=$(nproc)
    : > "$1"
    for ((i = 0; i < n; i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: %s\nCPU revision\t: 3\n\n' \
            "$i" "$features" "$part" >> "$1"
    done
}

mount_root() {
    local r=$ROOT
    mountpoint -q "$r/proc" || mount -t proc proc "$r/proc"
    if ! native_host; then
        write_cpuinfo "$r/run/edgelm-cpuinfo"
        mountpoint -q "$r/proc/cpuinfo" || mount --bind "$r/run/edgelm-cpuinfo" "$r/proc/cpuinfo"
    fi
    mountpoint -q "$r/sys" || { mount --bind /sys "$r/sys" && mount -o remount,bind,ro "$r/sys"; }
    # /dev: debootstrap made the device nodes sshd and Python need (null, urandom, ...); nothing
    # of the host's /dev is bound in. Sessions get no pty (edgelm never asks for one).
}

umount_root() {
    local m
    for m in $(mounts_under "$ROOT" | sort -r); do umount "$m" || umount -l "$m"; done
}

cmd_start() {
    need_root
    need_tools ssh ssh-keygen chroot
    ensure_binfmt
    [ -f "$ROOT/$READY" ] || cmd_build
    client_key
    write_ssh_config
    local home="$ROOT/home/$BOARD_USER"
    install -d -m 700 "$home/.ssh"
    install -m 600 "$STATE/id_ed25519.pub" "$home/.ssh/authorized_keys"
    chroot "$ROOT" chown -R "$BOARD_USER:$BOARD_USER" "/home/$BOARD_USER/.ssh"
    if pid=$(board_pid); then
        say "board sshd already running (pid $pid)"
    else
        mount_root
        install -d -m 755 "$ROOT/run/sshd"
        sync_network_config "$ROOT"
        cat > "$ROOT/etc/ssh/edgelm_sshd_config" <<EOF
Port $PORT
ListenAddress 127.0.0.1
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile $SSHD_PID
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UsePAM no
SetEnv EDGELM_EMULATED=qemu-user QEMU_CPU=$BOARD_CPU
Subsystem sftp /usr/lib/openssh/sftp-server
MaxStartups 30:30:100
LoginGraceTime 120
EOF
        chroot "$ROOT" /usr/sbin/sshd -f /etc/ssh/edgelm_sshd_config -E /var/log/edgelm-sshd.log \
            || die "sshd did not start inside $ROOT (log: $ROOT/var/log/edgelm-sshd.log)"
    fi
    pin_host_key edgelm-board "$ROOT/etc/ssh/ssh_host_ed25519_key.pub"
    wait_ssh edgelm-board 60 || die "the board does not answer on 127.0.0.1:$PORT (log: $ROOT/var/log/edgelm-sshd.log)"
}

cmd_stop() {
    need_root
    local pid p
    if pid=$(board_pid); then kill "$pid" && say "stopped board sshd (pid $pid)"; fi
    # Sessions left behind by that sshd live in the board's root: stop them by pid.
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/root" 2>/dev/null)" = "$(readlink -f "$ROOT")" ] || continue
        kill "${p#/proc/}" 2>/dev/null && say "stopped board process ${p#/proc/}"
    done
    sleep 0.5
    umount_root
}

cmd_native_start() {
    need_tools ssh ssh-keygen
    [ -x /usr/sbin/sshd ] || die "/usr/sbin/sshd is missing; install openssh-server"
    client_key
    write_ssh_config
    local n="$STATE/native"
    install -d -m 700 "$n"
    install -m 600 "$STATE/id_ed25519.pub" "$n/authorized_keys"
    if [ -f "$n/sshd.pid" ] && kill -0 "$(cat "$n/sshd.pid")" 2>/dev/null; then
        say "native sshd already running (pid $(cat "$n/sshd.pid"))"
    else
        [ -f "$n/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C edgelm-native-host -f "$n/host_ed25519"
        [ "$(id -u)" != 0 ] || install -d -m 755 /run/sshd
        cat > "$n/sshd_config" <<EOF
Port $NATIVE_PORT
ListenAddress 127.0.0.1
HostKey $n/host_ed25519
PidFile $n/sshd.pid
AuthorizedKeysFile $n/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp /usr/lib/openssh/sftp-server
MaxStartups 30:30:100
EOF
        /usr/sbin/sshd -f "$n/sshd_config" -E "$n/sshd.log" || die "native sshd did not start (log: $n/sshd.log)"
    fi
    pin_host_key edgelm-native "$n/host_ed25519.pub"
    wait_ssh edgelm-native 20 || die "native sshd does not answer on 127.0.0.1:$NATIVE_PORT (log: $n/sshd.log)"
}

cmd_native_stop() {
    local f="$STATE/native/sshd.pid" pid
    pid=$(cat "$f" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" && say "stopped native sshd (pid $pid)"
    fi
    rm -f "$f"
}

cmd_status() {
    if [ -f "$ROOT/$READY" ]; then echo "root:   $ROOT (built $(cat "$ROOT/$READY"))"; else echo "root:   not built ($ROOT)"; fi
    if pid=$(board_pid 2>/dev/null); then echo "board:  sshd pid $pid on 127.0.0.1:$PORT"; else echo "board:  stopped"; fi
    local f="$STATE/native/sshd.pid"
    if [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then
        echo "native: sshd pid $(cat "$f") on 127.0.0.1:$NATIVE_PORT"
    else
        echo "native: stopped"
    fi
    echo "config: $STATE/ssh_config"
}

cmd_env() {
    printf 'EDGELM_DEVICE=ssh://edgelm-board\nEDGELM_NATIVE_DEVICE=ssh://edgelm-native\nEDGELM_SSH_CONFIG=%s\n' \
        "$STATE/ssh_config"
}

case "${1:-}" in
    build) cmd_build ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    native-start) cmd_native_start ;;
    native-stop) cmd_native_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
