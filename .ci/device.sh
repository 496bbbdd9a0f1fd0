#!/usr/bin/env bash
# CI step: device tests over ssh, on an emulated arm64 board and on a native loopback sshd.
#
#   .ci/device.sh deps   apt packages only (openssh-server, adb, qemu-user-static, debootstrap): run it
#                        before the main pytest so tests/test_transports.py finds sshd and adb
#   .ci/device.sh        deps, then build or reuse the board, start both sshds, run device_tests on each,
#                        once per format in EDGELM_DEVICE_FORMATS (default: onnx tflite)
#
# The board's root is cached in /var/cache/edgelm-board (EDGELM_BOARD_ROOT): ~6 min to build once,
# seconds to reuse. The venv the tests make on the board lives in that root too, so a warm run
# installs nothing; EDGELM_CI_FRESH_VENV=1 makes a new one (pip's cache in the workdir stays). Device
# reports land in device_tests/results/ (emulated-*.json for the board). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
BOARD=device_tests/emulated_board.sh
PACKAGES=(openssh-server openssh-client adb qemu-user-static debootstrap binfmt-support)

stamp() { printf '[device.sh %s] %s\n' "$(date +%T)" "$*"; }

deps() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        stamp "apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

if [ "$(id -u)" != 0 ]; then
    echo "device.sh: needs root (apt-get, debootstrap, chroot); skipping the device tests" >&2
    exit 0
fi
deps
[ "${1:-}" = deps ] && exit 0

cleanup() { $BOARD stop || true; $BOARD native-stop || true; }
trap cleanup EXIT

t0=$(date +%s)
stamp "board: build or reuse"
$BOARD build
stamp "board: start (build/reuse took $(( $(date +%s) - t0 ))s)"
$BOARD start
$BOARD native-start
eval "$($BOARD env | sed 's/^/export /')"

STATE=${EDGELM_BOARD_STATE:-/var/tmp/edgelm-board}
if [ "${EDGELM_CI_FRESH_VENV:-0}" = 1 ]; then
    ssh -F "$EDGELM_SSH_CONFIG" edgelm-board 'rm -rf ~/edgelm-device-tests/venv'  # keeps workdir/cache/pip
    rm -rf "$STATE/native-work/venv"
fi

FORMATS=${EDGELM_DEVICE_FORMATS:-onnx tflite}
t1=$(date +%s)
for fmt in $FORMATS; do
    stamp "device tests on the emulated arm64 board ($EDGELM_DEVICE), $fmt bundle"
    python -m pytest device_tests -q --device "$EDGELM_DEVICE" --ssh-config "$EDGELM_SSH_CONFIG" --device-format "$fmt"
done
t2=$(date +%s)
for fmt in $FORMATS; do
    stamp "device tests on the native loopback sshd ($EDGELM_NATIVE_DEVICE), $fmt bundle"
    python -m pytest device_tests -q --device "$EDGELM_NATIVE_DEVICE" --ssh-config "$EDGELM_SSH_CONFIG" \
        --device-format "$fmt" --workdir "$STATE/native-work" \
        --device-python "$(python -c 'import sys; print(sys.executable)')"
done
t3=$(date +%s)
stamp "done: board ready in $(( t1 - t0 ))s, emulated-board tests $(( t2 - t1 ))s, native tests $(( t3 - t2 ))s"
