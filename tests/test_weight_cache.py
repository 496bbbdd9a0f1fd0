"""XNNPACK's shared packed-weight cache for .pte bundles: on by default, same numbers, one copy of the weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import requires_smollm2

# Loads BUNDLE in a fresh process (the cache is a process-wide runtime option, set before the first
# program loads) and reports whether the cache is on, the anonymous memory the load added, the
# prefill logits' bytes and a short greedy continuation.
CODE = """
import hashlib, json, sys
import numpy as np

def anon_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:")) / 1024

from edgelm.runtime import Engine
import executorch.extension.pybindings.portable_lib, torch  # noqa: F401  counted before the load
before = anon_mb()
engine = Engine.load(sys.argv[1], threads=2)
loaded = anon_mb() - before
ids = engine.encode_prompt("The history of the printing press begins")
logits = engine.backend.prefill(np.array(ids[:engine.backend.max_prefill], dtype=np.int64), 0)
tokens = list(engine.generate_ids(ids, max_new_tokens=16))
print(json.dumps({"cache": engine.backend.weight_cache, "loaded_mb": loaded, "tokens": tokens,
                  "logits": hashlib.sha256(np.ascontiguousarray(logits, dtype=np.float32).tobytes()).hexdigest()}))
"""


def _load_in_child(bundle, cache: bool) -> dict:
    env = {**os.environ, "EDGELM_XNNPACK_WEIGHT_CACHE": "1" if cache else "0"}
    out = subprocess.run([sys.executable, "-c", CODE, str(bundle)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_weight_cache_is_on_by_default_and_changes_no_number(tiny_pte):
    on, off = _load_in_child(tiny_pte, True), _load_in_child(tiny_pte, False)
    assert on["cache"] is True and off["cache"] is False  # the option took, and the opt-out works
    assert on["logits"] == off["logits"]  # the same packed weights: bit-identical logits
    assert on["tokens"] == off["tokens"] and len(on["tokens"]) == 16


@pytest.mark.integration
@requires_smollm2
def test_smollm2_fp32_pte_keeps_one_packed_copy(smollm2_pte):
    """prefill and decode each packed their own copy of the 538 MB of fp32 weights; with the cache they share one."""
    manifest = json.loads((smollm2_pte / "edgelm.json").read_text())
    weights_mb = (smollm2_pte / manifest["io"]["data_file"]).stat().st_size / 1e6
    on, off = _load_in_child(smollm2_pte, True), _load_in_child(smollm2_pte, False)
    assert on["cache"] is True and off["cache"] is False
    assert on["logits"] == off["logits"] and on["tokens"] == off["tokens"]
    saved = off["loaded_mb"] - on["loaded_mb"]
    assert saved > 0.7 * weights_mb, (on["loaded_mb"], off["loaded_mb"], weights_mb)
