"""LiteRT (.tflite) lowering and runtime backend, on the tiny model.

One bundle is converted per module, with prefill signatures of 4 and 8 tokens so that
short prompts exercise padding in both and longer ones are chunked by the engine.
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch

from edgelm.bundle import load_manifest
from edgelm.errors import BackendUnavailableError, BundleError

from .conftest import convert_bundle

PREFILL = (4, 8)


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory):
    """A verified tflite bundle of the tiny model with prefill signatures of 4 and 8 tokens."""
    from edgelm.converters.lowering import tflite as lowering

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lowering, "DEFAULT_PREFILL_LENGTHS", PREFILL)
        return convert_bundle(tmp_path_factory.mktemp("tflite") / "tiny-tflite", fmt="tflite",
                              max_prefill=max(PREFILL))


@pytest.fixture(scope="module")
def eager(tiny_source):
    """A fresh functional decoder returning every position's logits (the session's tiny_model may be stateful)."""
    from edgelm.converters.model import build_decoder

    model = build_decoder(tiny_source.config, tiny_source.state_dict)
    model.full_logits = True

    def logits(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            out, _ = model(torch.tensor([ids]), torch.tensor([0]), model.empty_caches())
        return out[0].numpy()

    return logits


def _ids(n: int, seed: int, vocab: int = 256) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def test_choose_prefill_lengths():
    from edgelm.converters.lowering.tflite import choose_prefill_lengths

    assert choose_prefill_lengths((), 512, 2048) == (32, 128)
    assert choose_prefill_lengths((), 512, 64) == (32, 64)
    assert choose_prefill_lengths((), 100, 2048) == (32, 100)
    assert choose_prefill_lengths((), 16, 2048) == (16,)
    assert choose_prefill_lengths((64, 16, 4096), 512, 2048) == (16, 64, 512)


def test_step_matches_canonical_decoder(tiny_source, eager):
    """The export wrapper (read-only cache, split attention, last_index) equals the canonical decoder."""
    from edgelm.converters.lowering.tflite import LiteRTStep, sample_inputs
    from edgelm.converters.model import build_decoder

    cfg = tiny_source.config
    model = build_decoder(cfg, tiny_source.state_dict)
    ids = _ids(11, 1)
    full = eager(ids)
    step = LiteRTStep(model, 8).eval()
    kw = sample_inputs(cfg, 8)
    kw["tokens"][0, :5] = torch.tensor(ids[:5])
    kw["last_index"][0] = 4
    with torch.no_grad():
        out = step(**kw)
        np.testing.assert_allclose(out["logits"][0].numpy(), full[4], atol=1e-4)
        for i in range(cfg.n_layers):  # write the real rows, as the runtime does, then continue
            kw["k_cache"][i][:, :, :5] = out[f"k_new_{i}"][:, :, :5]
            kw["v_cache"][i][:, :, :5] = out[f"v_new_{i}"][:, :, :5]
        kw["tokens"].zero_()
        kw["tokens"][0, :6] = torch.tensor(ids[5:])
        kw["input_pos"][0], kw["last_index"][0] = 5, 5
        np.testing.assert_allclose(step(**kw)["logits"][0].numpy(), full[10], atol=1e-4)


def test_conversion_passes_parity(tiny_tflite, tiny_source):
    _, m = load_manifest(tiny_tflite)
    assert m.format == "tflite" and m.model_file == "model.tflite"
    parity = m.verification["parity"]
    assert parity["passed"] and parity["top1_agreement"] == 1.0 and parity["max_abs_err"] < 1e-3
    assert m.io["prefill_lengths"] == list(PREFILL) and m.io["max_prefill"] == max(PREFILL)
    assert m.io["int_dtype"] == "int32"
    assert set(m.verification["lowering"]["signatures"]) == {"decode", "prefill_4", "prefill_8"}


def test_weights_stored_once_and_shared(tiny_tflite, tiny_source):
    """The tied embedding is one buffer, and every signature uses the same weight buffers."""
    from ai_edge_litert import schema_py_generated as schema

    cfg = tiny_source.config
    buf = (tiny_tflite / "model.tflite").read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(buf, 0))
    sizes = [0 if b.data is None else len(b.data) for b in model.buffers]
    assert sizes.count(cfg.vocab_size * cfg.dim * 4) == 1
    assert sum(sizes) < cfg.num_parameters() * 4 * 1.15 + 200_000  # + masks and rotary tables
    used = [{t.buffer for t in sg.tensors if sizes[t.buffer] >= cfg.dim * cfg.dim * 4} for sg in model.subgraphs]
    assert len(used) == 3 and used[0] == used[1] == used[2]


def test_engine_greedy_matches_eager(tiny_tflite, tiny_model):
    """Engine generation equals the eager reference, with prompts chunked past the largest prefill length."""
    from edgelm.converters.verify import reference_run
    from edgelm.runtime import Engine

    engine = Engine.load(tiny_tflite)
    engine.eos_ids = frozenset()  # random weights: compare a fixed number of tokens
    for n, seed in ((19, 2), (13, 3), (3, 4)):  # chunks 8+8+3 (pads to 4), 8+5 (pads to 8), 3
        ids = _ids(n, seed)
        want, _ = reference_run(tiny_model, ids, 24)
        got = list(engine.generate_ids(ids, max_new_tokens=24))
        assert got == want, f"prompt of {n} tokens"


@pytest.mark.parametrize("io_mode", ["tensors", "runner"])
def test_padded_prefill_logits(tiny_tflite, eager, io_mode):
    """Padded chunks return the last real token's logits, at any start, up to the end of the window."""
    from edgelm.runtime.backends.litert import LiteRTBackend

    root, manifest = load_manifest(tiny_tflite)
    b = LiteRTBackend(root, manifest, threads=1, io_mode=io_mode)
    assert b.io_mode == io_mode and (b.min_prefill, b.max_prefill) == (2, 8)
    t = manifest.max_context
    ids = _ids(t, 5)
    full = eager(ids)
    pos = 0
    for n in (3, 5, 1, 8, 7, 2, 4):  # every padding amount of both signatures, and a decode
        got = b.decode(ids[pos], pos) if n == 1 else b.prefill(np.array(ids[pos:pos + n]), pos)
        np.testing.assert_allclose(got, full[pos + n - 1], atol=1e-4, err_msg=f"chunk {pos}..{pos + n}")
        pos += n
    while pos < t - 3:
        n = min(8, t - 3 - pos)
        if n >= 2:
            b.prefill(np.array(ids[pos:pos + n]), pos)
        else:
            b.decode(ids[pos], pos)
        pos += n
    # the last 3 positions: prefill_4 pads one position past the window
    np.testing.assert_allclose(b.prefill(np.array(ids[t - 3:]), t - 3), full[t - 1], atol=1e-4)
    # start over with another sequence: stale rows of the first one must not leak in
    other = _ids(12, 6)
    ref = eager(other)
    np.testing.assert_allclose(b.prefill(np.array(other[:5]), 0), ref[4], atol=1e-4)
    np.testing.assert_allclose(b.decode(other[5], 5), ref[5], atol=1e-4)
    np.testing.assert_allclose(b.prefill(np.array(other[6:12]), 6), ref[11], atol=1e-4)


def test_garbage_model_file_raises_bundle_error(tiny_tflite, tmp_path):
    from edgelm.runtime import Engine

    bad = tmp_path / "bad"
    shutil.copytree(tiny_tflite, bad)
    (bad / "model.tflite").write_bytes(b"this is not a flatbuffer" * 100)
    with pytest.raises(BundleError, match="model.tflite"):
        Engine.load(bad, verify=False)
    data = (tiny_tflite / "model.tflite").read_bytes()
    (bad / "model.tflite").write_bytes(data[: len(data) // 2])  # truncated: right identifier, broken flatbuffer
    with pytest.raises(BundleError, match="model.tflite"):
        Engine.load(bad, verify=False)


def test_manifest_that_does_not_fit_the_model(tiny_tflite):
    from edgelm.runtime.backends.litert import LiteRTBackend

    root, manifest = load_manifest(tiny_tflite)
    manifest.io = {**manifest.io, "prefill": {"16": "prefill_16"}}
    with pytest.raises(BundleError, match="prefill_16"):
        LiteRTBackend(root, manifest)


def test_missing_runtime_names_the_extra(monkeypatch):
    from edgelm.runtime.backends.litert import interpreter_class

    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    with pytest.raises(BackendUnavailableError, match=r"edgelm\[tflite\]"):
        interpreter_class()


@pytest.mark.parametrize("io_mode", ["tensors", "runner"])
def test_prefix_reuse(tiny_tflite, io_mode, monkeypatch):
    """The next prompt runs only the tokens the cache does not hold (from any position: a prefill
    signature brings its own cache inputs up to date), with a fresh engine's output."""
    from edgelm.runtime.backends.litert import IO_ENV

    from .test_chat import check_prefix_reuse

    monkeypatch.setenv(IO_ENV, io_mode)
    check_prefix_reuse(tiny_tflite)
