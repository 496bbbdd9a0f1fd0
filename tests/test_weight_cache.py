"""XNNPACK's shared packed-weight cache for .pte bundles: on for float weights, same numbers, one packed copy;
off for quantized weights, whose cache key leaves out the scales."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from .conftest import convert_bundle, requires_smollm2

# Loads BUNDLE in a fresh process (the cache is a process-wide runtime option, read when a program
# loads) and reports whether the cache is on, the anonymous memory the load added, the
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


def test_weight_cache_is_on_for_float_weights_and_changes_no_number(tiny_pte):
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


# Loads every bundle named in argv[2:] in one process and prints the last one's prefill logits;
# argv[1] == "force" makes quantized programs use the cache too (what edgelm avoids).
PAIR = """
import json, sys
import numpy as np
import edgelm.runtime.backends.executorch as bx
if sys.argv[1] == "force":
    bx.float_weights_only = lambda manifest: True
from edgelm.runtime import Engine
engines = [Engine.load(b, threads=2, verify=False) for b in sys.argv[2:]]
e = engines[-1]
logits = e.backend.prefill(np.arange(3, 11, dtype=np.int64), 0)
print(json.dumps({"cache": [x.backend.weight_cache for x in engines], "logits": np.asarray(logits).tolist()}))
"""


def _pair(mode: str, *bundles) -> dict:
    out = subprocess.run([sys.executable, "-c", PAIR, mode, *map(str, bundles)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_quantized_bundles_keep_their_own_scales(tmp_path, tiny_source):
    """B is A with one layer's rows doubled: the same int8 codes, scales twice A's. Sharing XNNPACK's cache
    would run B with A's scales; edgelm loads quantized programs without it, so B computes B."""
    import torch

    from edgelm.converters.compress.checkpoint import save_checkpoint

    doubled = dict(tiny_source.state_dict)
    doubled["layers.0.mlp.w_down.weight"] = tiny_source.state_dict["layers.0.mlp.w_down.weight"] * 2.0
    sources = {"A": tiny_source, "B": dataclasses.replace(tiny_source, state_dict=doubled)}
    bundles = {}
    for name, src in sources.items():
        ckpt = save_checkpoint(src, tmp_path / f"ckpt-{name}")
        bundles[name] = convert_bundle(tmp_path / f"pte-{name}", source=str(ckpt), scheme="w8a8", smooth=0.0,
                                       max_prefill=16, verify=False, evaluate=False)
    alone = _pair("default", bundles["B"])
    together = _pair("default", bundles["A"], bundles["B"])
    assert together["cache"] == [False, False]
    assert together["logits"] == alone["logits"]  # B computes B next to A
    a_alone = _pair("default", bundles["A"])
    assert a_alone["logits"] != alone["logits"]  # the two models really differ
    # the hazard being avoided: forced into the cache, B runs with A's scales and returns A's logits
    forced = _pair("force", bundles["A"], bundles["B"])
    assert forced["cache"] == [True, True]
    assert torch.allclose(torch.tensor(forced["logits"]), torch.tensor(a_alone["logits"]))
