"""Quantized LiteRT (.tflite) bundles on the tiny model: every scheme the lowering declares
converts, passes its gates, and quantizes what its report says it did.

The tiny model has random weights, so its logits are nearly tied and int4 flips many greedy
choices (the ExecuTorch w4a8 artifact of the same model agrees on about 0.55 of them too);
its w4a8 gate is lowered here, and a separate test checks the int4 weights themselves.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgelm.bundle import load_manifest
from edgelm.errors import FormatError

from .conftest import convert_bundle

PREFILL = (4, 8)
SCHEMES = ("w8", "w8a8", "w4a8")
MIN_TOP1 = {"w8": 0.8, "w8a8": 0.8, "w4a8": 0.3}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, eval_text):
    """Verified tflite bundles of the tiny model, one per quantized scheme (converted on first use)."""
    from edgelm.converters.lowering import tflite as lowering

    made = {}

    def get(scheme: str):
        if scheme not in made:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(lowering, "DEFAULT_PREFILL_LENGTHS", PREFILL)
                made[scheme] = convert_bundle(tmp_path_factory.mktemp(scheme) / f"tiny-{scheme}", fmt="tflite",
                                              scheme=scheme, max_prefill=max(PREFILL), eval=str(eval_text),
                                              eval_windows=2, min_top1=MIN_TOP1[scheme])
        return made[scheme]

    return get


@pytest.fixture(scope="module")
def eager(tiny_source):
    """fp32 logits of the canonical decoder at every position."""
    import torch

    from edgelm.converters.model import build_decoder

    model = build_decoder(tiny_source.config, tiny_source.state_dict)
    model.full_logits = True

    def logits(ids):
        with torch.no_grad():
            out, _ = model(torch.tensor([ids]), torch.tensor([0]), model.empty_caches())
        return out[0].numpy()

    return logits


@pytest.fixture(scope="module")
def float_file(tmp_path_factory, tiny_source):
    """An unverified fp32 .tflite of the tiny model (and its decoder), to quantize copies of."""
    from edgelm.converters.lowering import LowerOptions
    from edgelm.converters.lowering.tflite import lower_tflite
    from edgelm.converters.model import build_decoder

    model = build_decoder(tiny_source.config, tiny_source.state_dict)
    path = tmp_path_factory.mktemp("float") / "model.tflite"
    lower_tflite(model, path, LowerOptions(max_prefill=8, prefill_lengths=PREFILL))
    model.output.weight = model.tok_embeddings.weight
    return path, model


def _quantize_copy(float_file, tmp_path, spec):
    from edgelm.converters.lowering.tflite import quantize_tflite

    src, model = float_file
    path = tmp_path / f"{spec.scheme}.tflite"
    shutil.copy(src, path)
    return path, quantize_tflite(path, model, spec)


def _read(path):
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

    return fu.read_model(path.read_bytes())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_converts_passes_gates_and_quantizes_every_linear(quantized, tiny_source, scheme):
    root, m = load_manifest(quantized(scheme))
    assert m.format == "tflite" and m.scheme == scheme
    assert m.io["quantization"]["scheme"] == scheme
    assert m.verification["parity"]["passed"] and m.verification["quality"]["passed"]
    assert m.verification["quality"]["perplexity_increase"] < 0.05
    low = m.verification["lowering"]
    q = low["quantization"]
    n_linear = tiny_source.config.n_layers * 7 + 1
    assert q["tool"] == "ai-edge-quantizer"
    assert q["linear_total"] == q["linear_quantized"] == n_linear and q["linear_left_fp32"] == []
    assert q["embedding"] == "int8" and q["lm_head"] == "int8"
    assert q["weights"] == ("int4" if scheme == "w4a8" else "int8")
    body = "int4" if scheme == "w4a8" else "int8"
    signatures = len(low["signatures"])
    # per signature: the body linears in the scheme's type; the head and the embedding lookup int8;
    # the RMSNorm mean and RoPE rotation matmuls (5 + 4 in a 2-layer model) stay float
    ops = q["weight_ops_by_dtype"]
    if body == "int4":
        assert ops == {"int4": (n_linear - 1) * signatures, "int8": 2 * signatures, "float32": 9 * signatures}
    else:
        assert ops == {"int8": (n_linear + 1) * signatures, "float32": 9 * signatures}
    size = (root / "model.tflite").stat().st_size
    assert size == low["file_bytes"] < low["fp32_file_bytes"]
    # w8a8 smooths the activations first by default (the calibration text's ranges)
    assert m.io["quantization"].get("smooth") == (0.5 if scheme == "w8a8" else None)
    assert ("smoothing" in q) == (scheme == "w8a8")


def test_int4_is_smaller_than_int8_which_is_smaller_than_fp32(quantized):
    sizes = {s: load_manifest(quantized(s))[1].verification["lowering"]["file_bytes"] for s in ("w8a8", "w4a8")}
    fp32 = load_manifest(quantized("w8a8"))[1].verification["lowering"]["fp32_file_bytes"]
    assert sizes["w4a8"] < sizes["w8a8"] < 0.65 * fp32


@pytest.mark.parametrize("scheme", ["w8", "w4a8"])
def test_quantized_bundle_runs_in_both_io_modes(quantized, scheme):
    """Same I/O as fp32: the engine generates, and the tensor-view and runner paths agree."""
    from edgelm.runtime import Engine
    from edgelm.runtime.backends.litert import LiteRTBackend

    path = quantized(scheme)
    engine = Engine.load(path)
    engine.eos_ids = frozenset()
    ids = np.random.default_rng(0).integers(0, 256, 11).tolist()
    assert len(list(engine.generate_ids(ids, max_new_tokens=6))) == 6
    root, manifest = load_manifest(path)
    a, b = (LiteRTBackend(root, manifest, threads=1, io_mode=mode) for mode in ("tensors", "runner"))
    for x in (a, b):
        x.prefill(np.array(ids[:7]), 0)
    np.testing.assert_allclose(a.decode(ids[7], 7), b.decode(ids[7], 7), rtol=1e-5, atol=1e-5)


def test_int4_weights_are_blocks_of_the_group_size(quantized, tiny_source):
    """Every int4 weight in the file, unpacked and scaled by its block scales, is an original
    weight to within half a quantization step, with one scale per 32 inputs."""
    from ai_edge_litert import schema_py_generated as schema

    fm = _read(quantized("w4a8") / "model.tflite")
    weights = {k: v.numpy() for k, v in tiny_source.state_dict.items() if v.ndim == 2}
    found = set()
    for sg in fm.subgraphs:
        for t in sg.tensors:
            if t.type != schema.TensorType.INT4:
                continue
            details = t.quantization.details
            assert t.quantization.detailsType == schema.QuantizationDetails.BlockwiseQuantization
            assert details.blockSize == 32
            raw = np.frombuffer(fm.buffers[t.buffer].data, np.uint8)
            nibbles = np.stack([raw & 0xF, raw >> 4], -1).astype(np.int8).reshape(tuple(t.shape))
            q = np.where(nibbles > 7, nibbles - 16, nibbles)
            st = sg.tensors[details.scales]
            scales = np.frombuffer(fm.buffers[st.buffer].data, np.float16).astype(np.float32).reshape(tuple(st.shape))
            assert scales.shape == (t.shape[0], t.shape[1] // 32)
            step = np.repeat(scales, 32, axis=1)
            matches = [k for k, w in weights.items() if w.shape == q.shape
                       and np.all(np.abs(q * step - w) <= step / 2 * 1.01 + 1e-6)]
            assert len(matches) == 1, t.name
            found.add(matches[0])
    body = {k for k in weights if k.startswith("layers.")}
    assert found == body


def _table_buffers(path, cfg) -> list[int]:
    """Sizes of the buffers that can hold the embedding table (fp32, int8 or int4)."""
    n = cfg.vocab_size * cfg.dim
    return sorted(len(b.data) for b in _read(path).buffers if b.data is not None and len(b.data) in (n * 4, n, n // 2))


def _runs_close_to_eager(path, bundle, eager, ids):
    """Run ``path`` in place of ``bundle``'s model file; its logits follow the fp32 reference."""
    from edgelm.runtime.backends.litert import LiteRTBackend

    root, manifest = load_manifest(bundle)
    shutil.copy(path, root / manifest.model_file)  # a copy of the bundle: checksums are not checked here
    b = LiteRTBackend(root, manifest, threads=1)
    got = np.stack([b.prefill(np.array(ids[:6]), 0), *(b.decode(t, 6 + i) for i, t in enumerate(ids[6:]))])
    want = eager(ids)[5:]
    assert np.isfinite(got).all()
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9  # random weights: int4 is rough


@pytest.fixture
def spare_bundle(quantized, tmp_path):
    def make():
        dst = tmp_path / f"bundle{len(list(tmp_path.iterdir()))}"
        shutil.copytree(quantized("w8a8"), dst)
        return dst

    return make


def test_embedding_and_lm_head_choices(float_file, tmp_path, tiny_source, spare_bundle, eager):
    """Each choice is what the file holds; a tied table is stored once per precision (never once per
    signature), and every variant runs with the same I/O."""
    from edgelm.converters.quant import QuantSpec

    cfg = tiny_source.config
    n = cfg.vocab_size * cfg.dim
    ids = np.random.default_rng(1).integers(0, 256, 12).tolist()
    # default: one int8 per-row table serves the lookup and the head
    for scheme in ("w8", "w8a8"):
        path, q = _quantize_copy(float_file, tmp_path, QuantSpec(scheme))
        assert q["embedding"] == "int8" and q["lm_head"] == "int8" and _table_buffers(path, cfg) == [n]
    assert q["activations"] == "int8 dynamic"
    # fp32 embedding and head: the tied weight stays one float buffer, every other linear int8
    path, q = _quantize_copy(float_file, tmp_path, QuantSpec("w8a8", embedding="fp32", lm_head="fp32"))
    assert q["embedding"] == "fp32" and q["lm_head"] == "fp32" and _table_buffers(path, cfg) == [n * 4]
    assert q["linear_left_fp32"] == ["output"] and q["linear_quantized"] == q["linear_total"] - 1
    # an fp32 table beside an int8 head: two copies of the tied weight, one of each
    path, q = _quantize_copy(float_file, tmp_path, QuantSpec("w8a8", embedding="fp32"))
    assert q["embedding"] == "fp32" and q["lm_head"] == "int8" and _table_buffers(path, cfg) == [n, n * 4]
    _runs_close_to_eager(path, spare_bundle(), eager, ids)
    # int4 head ("scheme") beside an int8 table
    path, q = _quantize_copy(float_file, tmp_path, QuantSpec("w4a8", lm_head="scheme"))
    assert q["embedding"] == "int8" and q["lm_head"] == "int4" and q["linear_left_fp32"] == []
    assert _table_buffers(path, cfg) == [n // 2, n]
    _runs_close_to_eager(path, spare_bundle(), eager, ids)


def test_block_size_that_does_not_divide_is_reported(float_file, tmp_path):
    from edgelm.converters.quant import QuantSpec

    # dim 64, ffn 128: only w_down (in_features 128) takes blocks of 128; the int8 head is per channel
    _, q = _quantize_copy(float_file, tmp_path, QuantSpec("w4a8", group_size=128))
    assert "layers.0.mlp.w_down" not in q["linear_left_fp32"] and "layers.0.attn.wq" in q["linear_left_fp32"]
    assert q["linear_quantized"] == 2 + 1  # w_down of both layers + the head
    assert q["block_size"] == 128 and q["lm_head"] == "int8"
    assert q["zero_point"] == "symmetric"  # LiteRT's blockwise int4, whatever QuantSpec.int4_symmetric says


def test_unsupported_requests_fail_before_converting():
    from edgelm.converters.lowering import get_lowering, supported_schemes
    from edgelm.converters.lowering.tflite import check_quant
    from edgelm.converters.quant import QuantSpec

    assert supported_schemes("tflite") == ("fp32", "w8", "w8a8", "w4a8")
    with pytest.raises(FormatError, match="can do: fp32, w8, w8a8, w4a8"):
        get_lowering("tflite", "w8a8-static")
    with pytest.raises(FormatError, match="blocks of 32, 64, 128, 256"):
        check_quant(QuantSpec("w4a8", group_size=16))


def test_gpt2_query_projection_is_found_and_quantized(tmp_path):
    """GPT-2's q goes from wq straight into attention (no RoPE, no q norm): the attention scale must
    not end up folded into wq's weight by the converter, where the quantizer would not find it."""
    from edgelm.converters.lowering import LowerOptions, get_lowering
    from edgelm.converters.model import build_decoder
    from edgelm.converters.quant import QuantSpec
    from edgelm.converters.sources import load_tiny

    src = load_tiny(arch="gpt2", n_kv_heads=4, qkv_bias=True, o_bias=True, mlp_bias=True, max_context=32)
    _, lower = get_lowering("tflite", "w8a8")
    lowered = lower(build_decoder(src.config, src.state_dict), tmp_path / "model.tflite",
                    LowerOptions(max_prefill=8, prefill_lengths=(8,), quant=QuantSpec("w8a8")))
    q = lowered.report["quantization"]
    assert "linear_not_found" not in q and q["linear_quantized"] == q["linear_total"] == 13, q
