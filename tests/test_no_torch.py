"""The device side must import without torch."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import edgelm, edgelm.runtime, edgelm.bundle, edgelm.tokenizer, edgelm.sampling, edgelm.cli
import edgelm.runtime.backends
import edgelm.deploy, edgelm.deploy.transports, edgelm.deploy.deploy, edgelm.deploy.ondevice
import edgelm.deploy.remote_bench, edgelm.deploy.commands
heavy = [m for m in ("torch", "executorch", "transformers") if m in sys.modules]
assert not heavy, heavy
print("ok")
"""


def test_runtime_imports_without_torch():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
