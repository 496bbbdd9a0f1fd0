"""Huge pages for the runtimes' heap: when the glibc tunable is added, and that it takes effect."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgelm.runtime import hugepages
from edgelm.runtime.hugepages import TUNABLE, huge_pages_env


def test_the_tunable_is_added_only_where_it_changes_something():
    new = (2, 36)
    assert huge_pages_env({"A": "1"}, "madvise", new) == {"A": "1", "GLIBC_TUNABLES": f"{TUNABLE}=1"}
    # other tunables are kept
    env = huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", new)
    assert env == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}=1"}
    assert huge_pages_env({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, "madvise", new) is None  # the user chose
    assert huge_pages_env({"EDGELM_HUGE_PAGES": "0"}, "madvise", new) is None
    assert huge_pages_env({}, "always", new) is None  # the kernel gives them anyway
    assert huge_pages_env({}, "never", new) is None
    assert huge_pages_env({}, None, new) is None  # not Linux
    assert huge_pages_env({}, "madvise", (2, 31)) is None  # glibc before the tunable
    assert huge_pages_env({}, "madvise", ()) is None  # musl, Bionic


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(f) == "madvise"
    assert hugepages.thp_mode(tmp_path / "missing") is None


# Re-executes itself, then mallocs and touches 256 MiB the way a runtime's packed weights are allocated.
CODE = """
import ctypes, json, os
from edgelm.runtime import hugepages
hugepages.reexec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 256 << 20
p = libc.malloc(n)
ctypes.memset(p, 1, n)
print(json.dumps({"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES", ""),
                  "huge": hugepages.huge_pages_in_use(), "describe": hugepages.describe()}))
"""


def _child(**env) -> dict:
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(huge_pages_env({}) is None, reason="needs Linux THP in madvise mode and glibc 2.35+")
def test_reexec_puts_malloc_on_huge_pages():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "EDGELM_HUGE_PAGES")}
    on = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60, env=env)
    assert on.returncode == 0, on.stderr
    on = json.loads(on.stdout.strip().splitlines()[-1])
    off = _child(EDGELM_HUGE_PAGES="0")
    assert TUNABLE in on["tunables"] and on["describe"].startswith("on")
    assert TUNABLE not in off["tunables"] and off["describe"].startswith("off")
    # most of the 256 MiB lands on 2 MiB pages with the tunable, none of it without
    assert on["huge"] >= 128 << 20, on
    assert off["huge"] < 64 << 20, off


def test_engine_load_hints_at_the_tunable_when_it_would_help(tiny_pte, monkeypatch, caplog):
    import logging

    from edgelm.runtime import Engine, engine

    monkeypatch.setattr(engine, "huge_pages_env", lambda env: {})  # "it would change something"
    with caplog.at_level(logging.INFO, logger="edgelm.runtime.engine"):
        Engine.load(tiny_pte)
    assert f"GLIBC_TUNABLES={TUNABLE}=1" in caplog.text
    caplog.clear()
    monkeypatch.setattr(engine, "huge_pages_env", lambda env: None)
    with caplog.at_level(logging.INFO, logger="edgelm.runtime.engine"):
        Engine.load(tiny_pte)
    assert TUNABLE not in caplog.text
