"""The CLI as a user meets it: real subprocesses, exit codes, no tracebacks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def edgelm(*args, check=False):
    proc = subprocess.run([sys.executable, "-m", "edgelm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_clean_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


def test_run_streams_with_stats_and_inspect(tiny_pte):
    proc = edgelm("run", tiny_pte, "hello", "-n", "8", "--stats", check=True)
    assert "decode" in proc.stderr and "tokens/s" in proc.stderr
    assert proc.stdout.strip()
    out = edgelm("inspect", tiny_pte, check=True).stdout
    assert "format      pte" in out and "checksums   ok" in out
    manifest = json.loads(edgelm("inspect", tiny_pte, "--json", check=True).stdout)
    assert manifest["verification"]["parity"]["passed"] is True


def test_convert_bad_inputs(tmp_path):
    assert_clean_error(edgelm("convert", tmp_path / "missing-model", "-o", tmp_path / "o"), "not found")
    assert_clean_error(edgelm("convert", "builtin:tiny", "-f", "coreml", "-o", tmp_path / "o"), "unknown format")
    bad = tmp_path / "fake.gguf"
    bad.write_bytes(b"nope")
    assert_clean_error(edgelm("convert", bad, "-o", tmp_path / "o"), "not a GGUF")
    assert not (tmp_path / "o").exists()


def test_changed_and_missing_files_are_refused(tiny_pte, tmp_path):
    b = tmp_path / "copy"
    shutil.copytree(tiny_pte, b)
    with open(b / "model.ptd", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert_clean_error(edgelm("run", b, "hi"), "model.ptd", "sha256")
    shutil.copy(tiny_pte / "model.ptd", b / "model.ptd")
    (b / "tokenizer.json").unlink()
    assert_clean_error(edgelm("inspect", b), "tokenizer.json")


def test_prompt_longer_than_context(tiny_pte):
    assert_clean_error(edgelm("run", tiny_pte, "z" * 500, "-n", "4"), "context window")
    proc = edgelm("run", tiny_pte, "z" * 500, "-n", "4", "--truncate")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args,needle", [(["run", "nowhere", "hi"], "does not exist"),
                                         (["inspect", "nowhere"], "does not exist")])
def test_missing_bundle(args, needle):
    assert_clean_error(edgelm(*args), needle)
