"""`edgelm compare`: edgelm against its peers in one run (table, JSON, chart, skip rows)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import TINY, requires_smollm2

has_llamacpp = importlib.util.find_spec("llama_cpp") is not None
has_matplotlib = importlib.util.find_spec("matplotlib") is not None


def _row(name, kind, decode, scheme="fp32", **extra):
    s = {"median": decode, "min": decode * 0.9, "max": decode * 1.1}
    return {"name": name, "kind": kind, "scheme": scheme, "decode_tps": s, "prefill_tps": s,
            "ttft_s": {"median": 0.05, "min": 0.04, "max": 0.06}, "peak_rss_mb": 300.0, "size_mb": 10.0,
            "prompt_tokens": 20, **extra}


def _report(rows):
    return {"machine": {"cpu": "Test CPU", "cores": 2}, "threads": 2, "new_tokens": 8, "runs": 1, "warmup": 0,
            "prompt_tokens": 20, "top1_windows": 1, "top1_seq_len": 16, "rows": rows}


def test_table_ratios_skip_rows_and_chart(tmp_path):
    from edgelm.compare import _skip, format_peer_table, plot_peers

    rows = [_row("pytorch eager fp32", "eager", 10.0, weight_bits=32),
            _row("llama.cpp Q8_0", "llamacpp", 40.0, "Q8_0", weight_bits=8, top1={"top1_agreement": 0.97}),
            _skip("llama.cpp Q4_0", "llamacpp", "llama-cpp-python is not installed", weight_bits=4)]
    table = format_peer_table(_report(rows))
    lines = table.splitlines()
    assert lines[0].startswith("| row |") and len(lines) == 5
    assert "| 4.00x | 0.970 |" in lines[3]
    assert "skipped: llama-cpp-python is not installed" in lines[4]
    png = plot_peers(_report(rows), tmp_path / "peers.png")
    if has_matplotlib:
        assert png and (tmp_path / "peers.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert png is None


def test_compare_imports_without_torch():
    code = "import sys, edgelm.compare; assert 'torch' not in sys.modules; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_cli_compare_tiny_bundle_without_llamacpp(tiny_pte, tmp_path, monkeypatch):
    """A bundle row with top-1 agreement, and llama.cpp absent: a skip row that says why, not a crash."""
    import edgelm.compare
    from edgelm.cli import main

    monkeypatch.setattr(edgelm.compare, "llamacpp_missing", lambda: "llama-cpp-python is not installed (test)")
    out = tmp_path / "peers"
    res = CliRunner().invoke(main, ["compare", str(tiny_pte), "-o", str(out), "--source", TINY, "--no-eager",
                                    "--llamacpp", "Q8_0,Q4_0", "--runs", "1", "--warmup", "0", "-n", "4",
                                    "--windows", "1", "--seq-len", "16"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "peers.json").read_text())
    kinds = [r["kind"] for r in report["rows"]]
    assert kinds == ["llamacpp", "llamacpp", "bundle"]
    assert all(r["skipped"] == "llama-cpp-python is not installed (test)" for r in report["rows"][:2])
    b = report["rows"][2]
    assert b["decode_tps"]["median"] > 0 and b["peak_rss_mb"] > 0 and b["weight_bits"] == 32
    assert b["prompt_tokens"] == report["prompt_tokens"]
    assert b["top1"]["tokens"] == 16 and b["top1"]["top1_agreement"] >= 0.9  # fp32 artifact vs fp32 reference
    md = (out / "peers.md").read_text()
    assert "skipped: llama-cpp-python is not installed (test)" in md and "edgelm pte fp32" in md
    assert (out / "peers.png").is_file() == has_matplotlib


def test_llamacpp_needs_a_gguf_source(tiny_pte, tmp_path):
    from edgelm.compare import compare

    if not has_llamacpp:
        pytest.skip("llama-cpp-python is not installed")
    report = compare([], tmp_path, source=TINY, eager=False, llamacpp=("Q8_0",), runs=1, warmup=0, new_tokens=2,
                     windows=0, echo=lambda s: None)
    [row] = report["rows"]
    assert "not one; pass --gguf" in row["skipped"]


@pytest.mark.integration
@requires_smollm2
@pytest.mark.skipif(not has_llamacpp, reason="llama-cpp-python is not installed (pip install 'edgelm[llamacpp]')")
def test_llamacpp_row_times_and_agrees(tmp_path):
    """A Q8_0 GGUF made with llama.cpp's quantize API, timed in its own process, top-1 against itself."""
    from edgelm.bench import run_row
    from edgelm.compare import _preds_llamacpp, llamacpp_gguf
    from edgelm.converters.sources import embedded_default_path

    gguf = llamacpp_gguf(embedded_default_path(), "Q8_0", tmp_path / "cache")
    assert llamacpp_gguf(embedded_default_path(), "Q8_0", tmp_path / "cache") == gguf  # cached
    windows = np.arange(100, 132, dtype=np.int64).reshape(1, 32)
    np.savez(tmp_path / "ref.npz", windows=windows, top1=_preds_llamacpp(str(gguf), 2, windows))
    r = run_row({"kind": "llamacpp", "gguf": str(gguf), "qtype": "Q8_0", "prompt_ids": list(range(200, 220)),
                 "new_tokens": 8, "runs": 2, "warmup": 1, "threads": 2, "top1_ref": str(tmp_path / "ref.npz")})
    assert r["name"] == "llama.cpp Q8_0" and r["prompt_tokens"] == 20 and r["runs"] == 2
    assert r["decode_tps"]["min"] > 0 and r["ttft_s"]["median"] > 0 and r["size_mb"] > 50
    assert r["top1"] == {"top1_agreement": 1.0, "tokens": 32, "windows": 1}
