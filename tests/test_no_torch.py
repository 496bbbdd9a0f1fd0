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


def test_device_side_copy_runs_the_cli_without_converters(tmp_path):
    """What `edgelm deploy` copies to a device (edgelm/ without converters/) must run the CLI."""
    import shutil
    import site

    from edgelm.deploy.deploy import runtime_sources

    for f, rel in runtime_sources():
        dst = tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    assert not (tmp_path / "edgelm" / "converters").exists()
    code = (f"import sys; sys.path[:0] = [{str(tmp_path)!r}]; sys.path += {site.getsitepackages()!r}\n"
            "import edgelm; assert edgelm.__file__.startswith(sys.path[0]), edgelm.__file__\n"
            "from edgelm.cli import main\n"
            "main(['run', '--help'], standalone_mode=False)\n")
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0 and "Stream the model's answer" in proc.stdout, proc.stderr
