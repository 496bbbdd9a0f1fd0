"""Quantization: each scheme changes the weights it claims to, and the quality gate catches
a broken model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgelm.converters.evaluate import QualityGate, load_texts, quality_report, token_windows
from edgelm.converters.lowering import get_lowering, supported_schemes
from edgelm.converters.model import build_decoder
from edgelm.converters.quant import QuantSpec, quantize_torchao
from edgelm.converters.sources import load_tiny
from edgelm.errors import FormatError, SourceError, VerificationError
from edgelm.runtime import Engine

from .conftest import convert_bundle


def _linear_weights(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8"])
def test_torchao_schemes_quantize_what_they_claim(tiny_source, scheme):
    model = build_decoder(tiny_source.config, tiny_source.state_dict)
    report = quantize_torchao(model, QuantSpec(scheme, group_size=16))
    weights = _linear_weights(model)
    assert report["linear_quantized"] == report["linear_total"] == len(weights)
    assert all(type(w) is not nn.Parameter for w in weights.values())
    assert type(model.tok_embeddings.weight) is not nn.Parameter  # embedding int8 by default
    # int4 group-wise body: at most 16 distinct levels per group
    qdata = weights["layers.0.mlp.w_up.linear" if scheme == "w4a8" else "layers.0.mlp.w_up"].qdata
    if scheme == "w4a8":
        assert qdata.min() >= -8 and qdata.max() <= 7
    else:
        assert qdata.min() >= -128 and qdata.max() <= 127 and qdata.abs().max() > 7
    assert report["lm_head"] == "int8"


def test_group_size_that_does_not_divide_is_reported(tiny_source):
    cfg = tiny_source.config
    model = build_decoder(cfg, tiny_source.state_dict)
    report = quantize_torchao(model, QuantSpec("w4a8", group_size=128, embedding="fp32", lm_head="fp32"))
    # dim 64 and ffn 128: only w_down (in_features 128) divides by 128
    assert report["linear_left_fp32"] and "layers.0.mlp.w_down.linear" not in report["linear_left_fp32"]
    assert type(model.layers[0].mlp.w_down.linear.weight) is not nn.Parameter
    assert "layers.0.attn.wq" in report["linear_left_fp32"]
    assert report["linear_quantized"] == cfg.n_layers
    assert report["lm_head"] == "fp32" and type(model.tok_embeddings.weight) is nn.Parameter


def _on_q4_1_grid(model, block: int, seed: int = 0) -> None:
    """Put every block linear's weights on an asymmetric 4-bit grid (GGUF Q4_1's form:
    ``scale * u + minimum``, u in 0..15, both ends used) with bf16-exact scales."""
    gen = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != "output":
            n, k = m.weight.shape
            scale = (torch.rand(n, k // block, 1, generator=gen) * 0.02 + 0.005).to(torch.bfloat16).float()
            low = torch.randn(n, k // block, 1, generator=gen) * 0.05
            u = torch.randint(0, 16, (n, k // block, block), generator=gen).float()
            u[..., 0], u[..., 1] = 0, 15
            m.weight.data = (scale * u + low).reshape(n, k)


@pytest.mark.parametrize("block_minimum", [True, False])
def test_w4a8_block_minimum_is_exact_on_an_asymmetric_grid(tiny_source, block_minimum):
    model = build_decoder(tiny_source.config, tiny_source.state_dict)
    _on_q4_1_grid(model, 16)
    ref = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    x = torch.randn(1, 3, tiny_source.config.dim)
    with torch.no_grad():
        want = model.layers[0].attn.wq(x)
    report = quantize_torchao(model, QuantSpec("w4a8", group_size=16, lm_head="fp32",
                                               int4_symmetric=not block_minimum))
    assert report["linear_quantized"] == report["linear_total"] - 1  # all but the fp32 head
    wq = model.layers[0].attn.wq
    if block_minimum:
        assert report["zero_point"].startswith("float minimum")
        # the int4 part plus the float offsets reproduce every weight exactly
        w = wq.linear.weight.dequantize() + wq.offsets @ wq.indicator
        torch.testing.assert_close(w, ref["layers.0.attn.wq"], atol=1e-6, rtol=0)
        assert wq.linear.weight.qdata.min() == -8 and wq.linear.weight.qdata.max() == 7
        with torch.no_grad():  # left: only the dynamic int8 rounding of the activations
            assert (wq(x) - want).abs().max() < 0.02 * want.abs().max()
    else:  # symmetric int4 cannot hold an asymmetric 16-level grid: every block moves
        err = (wq.weight.dequantize() - ref["layers.0.attn.wq"]).abs().max()
        assert err > 1e-3 and report["zero_point"] == "symmetric"


def test_unsupported_scheme_names_the_supported_ones():
    with pytest.raises(FormatError, match="can do: fp32, w8a8, w4a8"):
        get_lowering("pte", "w8")
    assert "w4a8" in supported_schemes("pte")
    with pytest.raises(FormatError, match="unknown quantization scheme"):
        QuantSpec("int3")
    with pytest.raises(FormatError, match="power of two"):
        QuantSpec("w4a8", group_size=48)


def test_w8a8_pte_bundle_passes_quality_and_records_it(tmp_path, eval_text):
    path = convert_bundle(tmp_path / "q", scheme="w8a8", eval=str(eval_text), eval_windows=2)
    engine = Engine.load(path)
    assert engine.manifest.scheme == "w8a8"
    q = engine.manifest.verification["quality"]
    assert q["passed"] and q["top1_agreement"] >= 0.8 and q["windows"] == 2
    # pte w8a8 smooths activations by default, on the built-in calibration text
    assert engine.manifest.io["quantization"]["smooth"] == 0.5
    smoothing = engine.manifest.verification["lowering"]["quantization"]["smoothing"]
    assert smoothing["alpha"] == 0.5 and smoothing["points"] == 3 * engine.manifest.model.n_layers
    fp32 = convert_bundle(tmp_path / "f", eval=str(eval_text), eval_windows=2)
    size = lambda p: sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".pte", ".ptd"))  # noqa: E731
    assert size(path) < size(fp32)


def test_quality_gate_fails_a_broken_model(tmp_path, eval_text, tiny_source):
    # the "quantized" artifact is a model with other weights: what a broken quantization looks like
    broken = load_tiny(seed=1)
    assert not torch.equal(broken.state_dict["layers.0.attn.wq.weight"],
                           tiny_source.state_dict["layers.0.attn.wq.weight"])
    from edgelm.converters.pipeline import ConvertOptions, _convert_one
    from edgelm.converters.progress import Steps

    model = build_decoder(broken.config, broken.state_dict)
    opts = ConvertOptions(source="builtin:tiny", out=tmp_path / "b", progress=False)
    with Steps(4, enabled=False) as steps:
        path, _ = _convert_one(opts, "pte", tmp_path / "b", broken, model, QuantSpec(), steps)
    engine = Engine.load(path)
    reference = build_decoder(tiny_source.config, tiny_source.state_dict)
    with pytest.raises(VerificationError, match="quality gate"):
        quality_report(reference, engine, load_texts(eval_text), max_windows=2, gate=QualityGate())
    # and the same artifact against its own weights passes
    ok = quality_report(model, engine, load_texts(eval_text), max_windows=2, gate=QualityGate())
    assert ok["passed"] and ok["top1_agreement"] > 0.99


def test_text_loading_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        load_texts(tmp_path / "none.txt")
    (tmp_path / "d").mkdir()
    with pytest.raises(SourceError, match="no text files"):
        load_texts(tmp_path / "d")
    (tmp_path / "d" / "a.txt").write_text("short")
    from edgelm.converters.sources import tiny_tokenizer_json
    from edgelm.tokenizer import Tokenizer

    (tmp_path / "tok.json").write_text(tiny_tokenizer_json())
    with pytest.raises(SourceError, match="need at least"):
        token_windows(Tokenizer(tmp_path / "tok.json"), load_texts(tmp_path / "d"), 128, 4)


def _tiny_windows(tiny_source, n=4, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, tiny_source.config.vocab_size, (n, length), generator=g).tolist()


def _logits(model, window):
    with torch.no_grad():
        return model(torch.tensor([window]), torch.tensor([0]), model.empty_caches())[0]


def _with_outliers(tiny_source):
    """The tiny model with a few activation channels 40x larger and the weights reading them 40x smaller:
    the same float function, with the outliers real models have after RMSNorm."""
    model = build_decoder(tiny_source.config, tiny_source.state_dict).eval()
    with torch.no_grad():
        for b in model.layers:
            qkv, ups = (b.attn.wq, b.attn.wk, b.attn.wv), (b.mlp.w_gate, b.mlp.w_up) if b.mlp.gated else (b.mlp.w_up,)
            groups = ((b.attn_norm, qkv + ups),) if b.shared_norm else ((b.attn_norm, qkv), (b.mlp_norm, ups))
            for norm, lins in groups:
                norm.weight[:3] *= 40
                if getattr(norm, "bias", None) is not None:  # LayerNorm
                    norm.bias[:3] *= 40
                for lin in lins:
                    lin.weight[:, :3] /= 40
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi"])
def test_smoothing_keeps_the_float_model_and_lowers_the_int8_error(tiny_source, arch):
    """Three points per layer for SwiGLU; two for GPT-2, whose LayerNorm bias is scaled too; one for Phi,
    whose one norm per block feeds q/k/v and the MLP alike."""
    import copy

    from edgelm.converters.quant import smooth_activations

    if arch != "llama":
        tiny_source = load_tiny(arch=arch, n_kv_heads=4, qkv_bias=True, o_bias=True, mlp_bias=True)
    reference = _with_outliers(tiny_source)
    windows = _tiny_windows(tiny_source)
    smoothed = copy.deepcopy(reference)
    report = smooth_activations(reference, smoothed, windows, 0.5)
    points = {"llama": 3, "gpt2": 2, "phi": 1}[arch]
    assert report["points"] == points * tiny_source.config.n_layers and report["windows"] == len(windows)
    assert report["max_over_median_range"] > 10  # it saw the outliers
    assert not torch.equal(smoothed.layers[0].attn_norm.weight, reference.layers[0].attn_norm.weight)
    test = _tiny_windows(tiny_source, seed=1)
    for w in test:  # the same function in float
        torch.testing.assert_close(_logits(smoothed, w), _logits(reference, w), atol=1e-4, rtol=1e-4)

    def int8_error(model):
        q = copy.deepcopy(model)
        quantize_torchao(q, QuantSpec("w8a8", embedding="fp32", lm_head="fp32"))
        return sum(float((_logits(q, w) - _logits(reference, w)).abs().mean()) for w in test)

    plain, smooth = int8_error(reference), int8_error(smoothed)
    assert smooth < 0.7 * plain, (smooth, plain)


def test_smooth_option_is_checked():
    with pytest.raises(FormatError, match="between 0 and 1"):
        QuantSpec("w8a8", smooth=1.5)
    with pytest.raises(FormatError, match="quantized schemes"):
        QuantSpec("fp32", smooth=0.5)
    assert QuantSpec("w8a8", smooth=0.5).to_dict()["smooth"] == 0.5
    assert "smooth" not in QuantSpec("w8a8").to_dict()


def test_a_failed_format_all_leaves_no_empty_output(tmp_path, monkeypatch):
    """The first format failing leaves no empty OUT behind, which would make the next run ask for --force."""
    from edgelm.converters import pipeline
    from edgelm.errors import ConversionError

    real = pipeline.get_lowering

    def failing(fmt, scheme, kv_cache=None):
        ext, lower = real(fmt, scheme, kv_cache)

        def lower_or_fail(model, out, opts):
            if fmt == "pte":
                raise ConversionError("pte failed on purpose")
            return lower(model, out, opts)

        return ext, lower_or_fail

    monkeypatch.setattr(pipeline, "get_lowering", failing)
    with pytest.raises(ConversionError, match="on purpose"):
        pipeline.convert(pipeline.ConvertOptions(source="builtin:tiny", out=tmp_path / "all", format="all",
                                                 progress=False))
    assert not (tmp_path / "all").exists()


def test_smooth_is_refused_for_other_formats(tmp_path):
    with pytest.raises(FormatError, match="not onnx"):
        convert_bundle(tmp_path / "o", fmt="onnx", scheme="w8a8", smooth=0.5)
    assert not (tmp_path / "o").exists()


def test_smoothing_calibrates_within_a_short_context(tmp_path, eval_text):
    path = convert_bundle(tmp_path / "short", scheme="w8a8", max_context=48, max_prefill=16, eval=str(eval_text),
                          eval_windows=1)
    smoothing = Engine.load(path).manifest.verification["lowering"]["quantization"]["smoothing"]
    assert smoothing["windows"] >= 1
