"""Transparent huge pages for the weights the runtimes unpack in memory.

Every decode step reads all the weights, most of them from the copies the runtimes pack
into their own heap allocations (XNNPACK for .pte and .tflite, ONNX Runtime's
initializers). On 4 KiB pages that stream needs a new address translation every 64 cache
lines; 2 MiB pages need 512 times fewer.
Most Linux systems ship transparent huge pages in ``madvise`` mode: a region gets 2 MiB
pages only when its owner asks, and none of these runtimes ask. glibc (2.35+) asks for
every allocation when the process starts with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``.
Measured on a 2-core Xeon (README, Huge pages): decoding 5-14% faster, by format and scheme.

glibc reads tunables only at process start, so the ``edgelm`` command re-executes itself
once with the tunable set (:func:`reexec_with_huge_pages`); ``EDGELM_HUGE_PAGES=0`` turns
that off. An app embedding the runtime sets the variable when it starts its process.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "EDGELM_HUGE_PAGES"
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(path: Path = THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or None off Linux."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _glibc_version() -> tuple[int, ...]:
    lib, version = platform.libc_ver()
    if lib != "glibc":
        return ()
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return ()


_READ = "read"  # huge_pages_env's default: read the kernel's mode / glibc's version here


def huge_pages_env(env: Mapping[str, str], mode: str | None = _READ,
                   glibc: tuple[int, ...] | None = None) -> dict[str, str] | None:
    """``env`` plus the glibc tunable that puts heap allocations on huge pages, or None when that
    would change nothing: not glibc 2.35+, the kernel's mode is not ``madvise``, the tunable is
    already set, or ``EDGELM_HUGE_PAGES=0``."""
    mode = thp_mode() if mode == _READ else mode
    glibc = _glibc_version() if glibc is None else glibc
    current = env.get("GLIBC_TUNABLES", "")
    if env.get(OPT_OUT, "1") == "0" or mode != "madvise" or glibc < (2, 35) or TUNABLE in current:
        return None
    out = dict(env)
    out["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"
    return out


def reexec_with_huge_pages() -> None:
    """Replace this process with the same command line, started with :func:`huge_pages_env`'s
    environment; return without doing anything when that would change nothing.

    Call it first thing in a program's entry point: nothing before it runs twice.
    """
    env = huge_pages_env(os.environ)
    if env is None or os.name != "posix" or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # cannot re-execute (no executable path, a sandbox): run on with small pages
        return


def huge_pages_in_use() -> int:
    """Bytes of this process's anonymous memory on transparent huge pages (0 where unknown)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def describe(env: Mapping[str, str] | None = None) -> str:
    """One word or two for benchmark headers: whether this process's heap gets huge pages."""
    env = os.environ if env is None else env
    mode = thp_mode()
    if mode is None:
        return "unknown"
    if mode == "always":
        return "on (kernel: always)"
    if mode == "madvise" and TUNABLE in env.get("GLIBC_TUNABLES", "") and _glibc_version() >= (2, 35):
        return f"on ({TUNABLE}=1)"
    return f"off (kernel: {mode})"
