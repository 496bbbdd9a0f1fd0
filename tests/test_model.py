"""The canonical decoder against transformers' own modeling code, and its cache modes."""

from __future__ import annotations

import pytest
import torch

from edgelm.config import ModelConfig
from edgelm.converters.model import ATTENTION_IMPLS, build_decoder, state_dict_from_hf
from edgelm.converters.sources import config_from_hf, tiny_config

# every stateful attention impl, and the portable .pte's length input (Decoder.length_input)
STATEFUL_MODES = [(impl, False) for impl in ATTENTION_IMPLS] + [("portable", True)]


def _random_hf(cls_model, hf_cfg):
    """A transformers model with seeded weights of std 0.2 (away from init, so logits differ)."""
    torch.manual_seed(0)
    hf = cls_model(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    return hf


def _hf_pair(model_type: str, **kw):
    import transformers

    names = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "phi3": "Phi3",
             "smollm3": "SmolLM3", "granite": "Granite", "helium": "Helium", "ernie4_5": "Ernie4_5", "glm": "Glm",
             "stablelm": "StableLm", "phi": "Phi", "gpt_neox": "GPTNeoX", "olmo2": "Olmo2", "exaone4": "Exaone4",
             "hunyuan_v1_dense": "HunYuanDenseV1", "gemma": "Gemma", "olmo3": "Olmo3", "lfm2": "Lfm2"}
    cls_cfg = getattr(transformers, names[model_type] + "Config")
    cls_model = getattr(transformers, names[model_type] + "ForCausalLM")
    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    hf = _random_hf(cls_model, cls_cfg(**{k: v for k, v in {**shape, **kw}.items() if v is not None}))
    cfg = config_from_hf(hf.config, max_context=64)
    return hf, build_decoder(cfg, state_dict_from_hf(hf.state_dict(), cfg, hf.config))


def _assert_logits_match(hf, model, n_tokens: int) -> None:
    ids = torch.randint(0, 300, (1, n_tokens))
    with torch.no_grad():
        ref = hf(ids).logits
        model.full_logits = True
        got, _ = model(ids, torch.tensor([0]), model.empty_caches())
    assert torch.allclose(ref, got, atol=1e-4), (ref - got).abs().max()


@pytest.mark.parametrize("model_type,kw", [
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"tie_word_embeddings": False, "rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    ("qwen2", {"tie_word_embeddings": False}),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}),
    ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 64,
                                "beta_fast": 16, "mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False}}),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128,
                                "attention_factor": 1.3}}),
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    ("mistral", {"sliding_window": None}),
    ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),  # per-head q/k RMSNorm; heads wider than dim/H
    ("phi3", {"pad_token_id": 0, "eos_token_id": 1}),  # fused qkv_proj and gate_up_proj
    # Granite's multipliers, away from 1, folded into the weights; tied and untied LM heads
    ("granite", {"embedding_multiplier": 12.0, "attention_multiplier": 0.02, "residual_multiplier": 0.22,
                 "logits_scaling": 8.0, "tie_word_embeddings": True}),
    ("granite", {"embedding_multiplier": 3.0, "attention_multiplier": 0.3, "residual_multiplier": 0.5,
                 "logits_scaling": 2.0, "tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True}),
    # interleaved RoPE pairs, reordered into split halves: over the whole head (Helium, ERNIE 4.5) or its
    # first half (GLM), with GLM's q/k/v biases and fused gate_up_proj, ERNIE's biases on every linear
    ("helium", {"head_dim": 16, "attention_bias": True}),
    ("ernie4_5", {"head_dim": 16, "use_bias": True}),
    ("glm", {"head_dim": 16, "attention_bias": True, "pad_token_id": 0, "eos_token_id": 1}),
    # StableLM 2: LayerNorm (with bias) in a Llama, RoPE on a quarter of each head, q/k/v biases
    ("stablelm", {"partial_rotary_factor": 0.25, "use_qkv_bias": True}),
    # parallel attention and MLP: Phi (one shared LayerNorm, tanh GELU, a biased LM head, RoPE on 0.4 of a
    # head) and GPT-NeoX / Pythia (two LayerNorms, exact GELU, per-head fused q/k/v, RoPE on a quarter)
    ("phi", {"partial_rotary_factor": 0.5, "hidden_act": "gelu_new"}),
    ("gpt_neox", {"partial_rotary_factor": 0.25, "num_key_value_heads": None}),  # no GQA
    # norms on the attention and MLP outputs only: OLMo 2 (q/k norms over the whole projection) and EXAONE 4
    # (per-head q/k norms; an 8-token window on its local layers, no RoPE on its global one)
    ("olmo2", {"attention_bias": True}),
    # OLMo 3: OLMo 2 with an 8-token window on its local layers, which keep their own RoPE base while the
    # global one is YaRN-scaled
    ("olmo3", {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
               "rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 50000.0,
                                                      "original_max_position_embeddings": 64},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
    ("exaone4", {"head_dim": 16, "sliding_window": 8,
                 "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    # an activation other than the architecture's: a Llama with GeGLU (exact GELU); Gemma 1 with its
    # default tanh GELU and with the exact one its released configs name
    ("llama", {"hidden_act": "gelu"}),
    ("gemma", {"head_dim": 16}),
    ("gemma", {"head_dim": 16, "hidden_act": "gelu", "num_key_value_heads": 1}),
    # Hunyuan: per-head q/k norms after the rotary embedding, NTK-alpha RoPE (a fixed larger base)
    ("hunyuan_v1_dense", {"head_dim": 16, "rope_parameters": {"rope_type": "dynamic", "alpha": 1000.0,
                                                               "rope_theta": 10000.0, "factor": 1.0}}),
])
def test_logits_match_transformers(model_type, kw):
    hf, model = _hf_pair(model_type, **kw)
    _assert_logits_match(hf, model, 20)
    assert model.cfg.num_parameters() == sum(p.numel() for p in hf.parameters())


def test_smollm3_nope_layers_match_transformers():
    """SmolLM3: a Llama whose every 4th layer (here the middle one) has no rotary embedding."""
    hf, model = _hf_pair("smollm3", no_rope_layers=[1, 0, 1], pad_token_id=0, tie_word_embeddings=True)
    cfg = model.cfg
    assert (cfg.arch, cfg.nope_layers, [b.attn.rope for b in model.layers]) == ("llama", [1], [True, False, True])
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and "nope_layers" not in tiny_config().to_dict()
    _assert_logits_match(hf, model, 40)
    _assert_stateful_decoding_matches(hf, cfg, model.state_dict())
    rotating = build_decoder(ModelConfig.from_dict({**cfg.to_dict(), "nope_layers": None}), model.state_dict())
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        rotating.full_logits = True
        diff = model(ids, torch.tensor([0]), model.empty_caches())[0] - \
            rotating(ids, torch.tensor([0]), rotating.empty_caches())[0]
    assert diff.abs().max() > 1e-2  # the test would see a NoPE layer that rotates


@pytest.mark.parametrize("conv_bias", [False, True])
def test_lfm2_convolution_layers_match_transformers(conv_bias):
    """LFM2: gated short-convolution layers between attention layers. The convolution reads B * X of the two
    positions before a call's first one from the cache, so chunked prefill and decoding, in every cache mode
    (functional as ONNX and LiteRT run it, stateful as ExecuTorch does), give transformers' logits."""
    from edgelm.converters.model import ShortConv

    hf, model = _hf_pair("lfm2", layer_types=["conv", "full_attention", "conv", "conv"], num_hidden_layers=4,
                         intermediate_size=144, block_multiple_of=16, conv_bias=conv_bias)
    cfg = model.cfg
    assert (cfg.arch, cfg.conv_layers, cfg.conv_kernel, cfg.ffn_dim) == ("lfm2", [0, 2, 3], 3, [96] * 4)
    assert [isinstance(b.attn, ShortConv) for b in model.layers] == [True, False, True, True]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and "conv_layers" not in tiny_config().to_dict()
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    _assert_logits_match(hf, model, 24)
    _assert_stateful_decoding_matches(hf, cfg, model.state_dict())
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        ref = hf(ids).logits
        caches, pos = model.empty_caches(), 0
        model.full_logits = True
        for n in (11, 1, 1, 2, 15):  # the runtime's way: new rows come back and are written at their positions
            logits, rows = model(ids[:, pos:pos + n], torch.tensor([pos]), caches)
            at = torch.arange(pos, pos + n)
            caches = [(k.index_copy(2, at, nk), v.index_copy(2, at, nv)) for (k, v), (nk, nv) in zip(caches, rows)]
            assert torch.allclose(logits, ref[:, pos:pos + n], atol=1e-4), pos
            pos += n


@pytest.mark.parametrize("variant", ["plain", "sliding window", "soft cap", "lfm2"])
def test_int8_kv_cache_follows_the_fp32_cache(tiny_source, variant):
    """An int8 KV cache (ExecuTorch's quantized attention kernel, or, as the pte's prefill does it, the filled
    rows dequantized for the fp32 kernel; for Gemma 2's capped scores, rows dequantized here). In the first
    layer, whose input is the fp32 model's, each cached row decodes back to the fp32 row within half a step of
    its own scale; the logits, through chunked prefill and decoding, stay within 5% of fp32's and keep their
    argmax, and so do the functional int8 cache's (ONNX's, symmetric rows) and the portable .pte's (symmetric
    rows in its own layout, scales folded into its scores). A convolution layer's cache stays fp32."""
    from edgelm.converters.model import dequantize_rows

    if variant == "lfm2":
        _, model = _hf_pair("lfm2", layer_types=["full_attention", "conv", "full_attention"], num_hidden_layers=3)
        cfg, sd = model.cfg, model.state_dict()
    else:
        extra = {"sliding window": {"sliding_window": 8, "local_layers": [0]}, "soft cap": {"attn_softcap": 30.0}}
        cfg = ModelConfig.from_dict({**tiny_source.config.to_dict(), **extra.get(variant, {})})
        sd = tiny_source.state_dict
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    runs = {}
    for kv in ("fp32", "int8", "int8 dequantized"):
        runs[kv] = build_decoder(cfg, sd).make_stateful("executorch", kv.split()[0])
        runs[kv].full_logits = True
        for block in runs[kv].layers:  # the pte's prefill: the filled rows dequantized, the fp32 kernel
            block.attn.int8_sdpa = kv == "int8"
    ref, got, dequantized = (_run_stateful(runs[kv], ids, [17, 1, 1, 21]) for kv in runs)
    assert (ref - dequantized).abs().max() < 0.05 * ref.abs().max()
    functional = build_decoder(cfg, sd).functional_cache("int8")  # the ONNX graph's int8 cache (symmetric rows)
    functional.full_logits = functional.window_attention = True
    onnx_like = _run_functional(functional, ids, [17, 1, 1, 21])
    assert (ref - onnx_like).abs().max() < 0.05 * ref.abs().max()
    assert (ref.argmax(-1) == onnx_like.argmax(-1)).float().mean() >= 0.95
    portable = build_decoder(cfg, sd).make_stateful("portable", "int8")
    portable.full_logits = portable.length_input = True
    portable_out = _run_stateful(portable, ids, [17, 1, 1, 21])
    assert (ref - portable_out).abs().max() < 0.05 * ref.abs().max()
    assert (ref.argmax(-1) == portable_out.argmax(-1)).float().mean() >= 0.95
    assert (portable_out - onnx_like).abs().max() < 0.01 * ref.abs().max()  # one row format, two layouts
    layer = portable.layers[attn_layer(cfg)].attn
    assert layer.k_cache.dtype == torch.int8 and not hasattr(layer, "k_zeros")
    assert (ref.argmax(-1) == dequantized.argmax(-1)).float().mean() >= 0.95
    fp32, int8 = runs["fp32"].layers, runs["int8"].layers
    attn = [i for i in range(cfg.n_layers) if not cfg.is_conv(i)]
    assert [int8[i].attn.k_cache.dtype for i in range(cfg.n_layers)] == [
        torch.float32 if cfg.is_conv(i) else torch.int8 for i in range(cfg.n_layers)]
    first = int8[attn[0]].attn
    for codes, scales, zeros, rows in ((first.k_cache, first.k_scales, first.k_zeros, fp32[attn[0]].attn.k_cache),
                                       (first.v_cache, first.v_scales, first.v_zeros, fp32[attn[0]].attn.v_cache)):
        n = ids.shape[1]
        err = (dequantize_rows(codes[:, :n], scales[:, :n], zeros[:, :n]) - rows[:, :n]).abs()
        assert (err <= scales[:, :n] * 0.51 + 1e-6).all()
        assert err.max() > 0  # the rows are quantized, not kept
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() >= 0.95  # random weights: near ties may flip
    assert (ref - got).abs().max() < 0.05 * ref.abs().max()


def test_symmetric_row_quantization():
    """The ONNX int8 cache's rows: codes in -127..127 with the row's largest magnitude at ±127, and every row
    decodes (code * scale) to within half a step of itself; rows of one sign and all-zero rows included. The
    portable .pte's rows are the same but for ties."""
    from edgelm.converters.model import quantize_rows_symmetric, quantize_rows_xnnpack

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 200, 64, generator=g) * torch.rand(1, 3, 200, 1, generator=g) * 20
    x[0, 0, 0], x[0, 0, 1], x[0, 0, 2] = 0.0, x[0, 0, 1].abs(), -x[0, 0, 2].abs()
    codes, scales = quantize_rows_symmetric(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scales.shape == (1, 3, 200, 1)
    assert codes.min() >= -127 and ((codes.abs().amax(dim=-1) == 127) == (x.abs().amax(dim=-1) > 0)).all()
    assert ((codes.float() * scales - x).abs() <= scales * 0.5001).all()
    assert (codes[0, 0, 0] == 0).all()
    rows = x[0].transpose(0, 1)  # the portable .pte's new rows, [S, KV, D], in ops XNNPACK takes
    xc, xs = quantize_rows_xnnpack(rows)
    assert xc.dtype == torch.int8 and xs.shape == (200, 3, 1)
    torch.testing.assert_close(xs, scales[0].transpose(0, 1))
    assert (xc.int() - codes[0].transpose(0, 1).int()).abs().max() <= 1  # only ties may round the other way
    assert ((xc.float() * xs - rows).abs() <= xs * 0.5001).all()


def test_lfm2_refusals():
    import transformers

    from edgelm.errors import SourceError

    hf_cfg = transformers.Lfm2Config(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=3, num_key_value_heads=3,
                                     layer_types=["conv", "full_attention"])
    with pytest.raises(SourceError, match=r"hidden_size 48 not a multiple of 2 \* head_dim \(32\)"):
        config_from_hf(hf_cfg)
    hf_cfg = transformers.Lfm2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, layer_types=["conv", "full_attention"])
    hf_cfg.layer_types = ["conv", "sliding_attention"]
    with pytest.raises(SourceError, match=r"LFM2 layer types \['conv', 'sliding_attention'\] are not supported"):
        config_from_hf(hf_cfg)


def _longrope(original: int, **kw) -> dict:
    """Phi-3.5 / Phi-4-mini style: LongRoPE over the first 12 of 16 head dimensions (6 frequencies)."""
    return {"pad_token_id": 0, "eos_token_id": 1, "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": original,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.3, 1.9, 2.2, 4.0, 7.5],
                             "long_factor": [1.5, 2.6, 4.1, 9.0, 17.0, 30.0], **kw}}


@pytest.mark.parametrize("kw,n_tokens,factor", [
    ({"pad_token_id": 0, "eos_token_id": 1, "partial_rotary_factor": 0.5}, 40, None),  # partial rotary alone
    (_longrope(128), 40, "short"),  # the context (64) fits the pretraining one: short factors, like transformers
    (_longrope(32), 40, "long"),  # past it: long factors, like transformers once a sequence passes 32
    (_longrope(128, attention_factor=1.1), 20, "short"),
])
def test_partial_rotary_and_longrope_match_transformers(kw, n_tokens, factor):
    import math

    from edgelm.converters.model import rope_attention_scale, rope_inv_freq

    hf, model = _hf_pair("phi3", **kw)
    cfg = model.cfg
    assert cfg.rotary_dim == int(16 * kw["partial_rotary_factor"]) and cfg.to_dict()["rotary_dim"] == cfg.rotary_dim
    _assert_logits_match(hf, model, n_tokens)
    _assert_stateful_decoding_matches(hf, cfg, model.state_dict())
    if factor:  # the test would see the other table: the two factor lists give other frequencies
        rs = cfg.rope_scaling
        want = 1 / torch.tensor(rs[f"{factor}_factor"], dtype=torch.float64)
        assert torch.allclose(rope_inv_freq(cfg) / rope_inv_freq(ModelConfig.from_dict(
            {**cfg.to_dict(), "rope_scaling": None})), want)
        scale = rs.get("attention_factor") or math.sqrt(1 + math.log(256 / rs["original_max_position_embeddings"])
                                                        / math.log(rs["original_max_position_embeddings"]))
        assert rope_attention_scale(cfg) == pytest.approx(scale) and scale > 1


def test_config_from_hf_reads_qwen_bias_and_llama3_rope():
    hf, model = _hf_pair("qwen2")
    assert model.cfg.qkv_bias and model.layers[0].attn.wq.bias is not None
    assert model.cfg.arch == "qwen2"


def test_sliding_window_attention_matches_transformers_past_the_window():
    hf, model = _hf_pair("mistral", sliding_window=16)
    assert (model.cfg.max_context, model.cfg.sliding_window, model.cfg.local_layers) == (64, 16, None)
    _assert_logits_match(hf, model, 48)
    _assert_stateful_decoding_matches(hf, model.cfg, model.state_dict())
    # Qwen2 slides from layer max_window_layers up: layer 2 only
    hf, model = _hf_pair("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert (model.cfg.sliding_window, model.cfg.local_layers, model.cfg.local_rope_theta) == (8, [2], None)
    assert [model.cfg.window(i) for i in range(3)] == [None, None, 8]
    _assert_logits_match(hf, model, 40)
    _assert_stateful_decoding_matches(hf, model.cfg, model.state_dict())
    hf, model = _hf_pair("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=3)
    assert model.cfg.sliding_window is None  # max_window_layers=3 of 3: no layer slides
    hf, model = _hf_pair("mistral", sliding_window=64)
    assert "sliding_window" not in model.cfg.to_dict()  # a window as long as the context changes nothing


def test_unsupported_variants_are_a_clear_source_error():
    """A Llama-shaped config with an activation edgelm lacks would convert to a model that is silently
    wrong; so would StableLM's parallel blocks."""
    import transformers

    from edgelm.errors import SourceError

    hf_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=256, hidden_act="quick_gelu")
    with pytest.raises(SourceError, match="llama MLP activation 'quick_gelu' is not supported yet"):
        config_from_hf(hf_cfg, max_context=64)
    hf_cfg.hidden_act = "silu"
    cfg = config_from_hf(hf_cfg, max_context=64)
    assert (cfg.arch, cfg.activation, cfg.mlp_activation) == ("llama", None, "silu")  # the manifest keeps no field
    assert "activation" not in cfg.to_dict()
    stablelm = transformers.StableLmConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                           num_attention_heads=4, use_parallel_residual=True)
    with pytest.raises(SourceError, match="stablelm with use_parallel_residual=True is not supported yet"):
        config_from_hf(stablelm, max_context=64)


def test_unsupported_rope_scaling_is_a_clear_source_error():
    import transformers

    from edgelm.errors import SourceError

    hf_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=256)
    hf_cfg.rope_parameters = {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(SourceError, match="RoPE scaling 'proportional' is not supported"):
        config_from_hf(hf_cfg, max_context=64)
    hf_cfg.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8}
    with pytest.raises(SourceError, match="'longrope' needs long_factor, original_max_position_embeddings"):
        config_from_hf(hf_cfg, max_context=64)
    hf_cfg.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 6,
                              "long_factor": [1.0] * 6, "original_max_position_embeddings": 128}
    with pytest.raises(SourceError, match=r"short_factor has 6 entries; .* \(16 dimensions\) needs 8"):
        config_from_hf(hf_cfg, max_context=64)
    phi = transformers.Phi3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                  num_attention_heads=4, pad_token_id=0, partial_rotary_factor=0.1)
    with pytest.raises(SourceError, match="partial_rotary_factor 0.1 of head_dim 16 rotates 1 dimensions"):
        config_from_hf(phi, max_context=64)


def _assert_stateful_decoding_matches(hf, cfg, sd) -> None:
    """A prefill, two single-token decodes and another prefill, in every stateful cache mode."""
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        ref = hf(ids).logits
    for impl, length_input in STATEFUL_MODES:
        stateful = build_decoder(cfg, sd).make_stateful(impl)
        stateful.full_logits, stateful.length_input = True, length_input
        assert torch.allclose(ref, _run_stateful(stateful, ids, [17, 1, 1, 21]), atol=1e-4), impl


def _gemma3_pair(max_context: int = 64, **kw):
    import transformers

    hf_cfg = transformers.Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention"] * 2, pad_token_id=0, **{"sliding_window": 128, **kw})
    hf = _random_hf(transformers.Gemma3ForCausalLM, hf_cfg)
    cfg = config_from_hf(hf.config, max_context=max_context)
    return hf, cfg, state_dict_from_hf(hf.state_dict(), cfg, hf.config)


@pytest.mark.parametrize("kw", [{}, {"rope_parameters": {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}}])
def test_gemma3_logits_match_transformers(kw):
    """Gemma 3: GeGLU, sandwich and q/k norms (1 + w), a sqrt(dim)-scaled embedding, the query
    scale from query_pre_attn_scalar, and a rotary base per layer type (scaling on global layers only)."""
    hf, cfg, sd = _gemma3_pair(**kw)
    assert cfg.local_layers == [0, 2] and cfg.local_rope_theta == 10_000.0 and cfg.rope_theta == 1_000_000.0
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    _assert_logits_match(hf, build_decoder(cfg, sd), 40)
    _assert_stateful_decoding_matches(hf, cfg, sd)


def test_gemma3_sliding_window_past_the_window_and_config_round_trips():
    hf, cfg, sd = _gemma3_pair(sliding_window=12)
    assert (cfg.max_context, cfg.sliding_window, cfg.local_layers) == (64, 12, [0, 2])
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    _assert_logits_match(hf, build_decoder(cfg, sd), 40)
    _assert_stateful_decoding_matches(hf, cfg, sd)
    _, cfg, _ = _gemma3_pair(max_context=200)
    assert (cfg.max_context, cfg.sliding_window) == (200, 128)  # no longer capped at the window
    _, cfg, _ = _gemma3_pair(max_context=128)
    assert cfg.sliding_window is None  # the window covers the context: plain causal attention
    for name in ("local_layers", "sliding_window"):
        assert name not in tiny_config().to_dict()  # older runtimes still read the other manifests


def _gemma2_pair(max_context: int = 64, **kw):
    import transformers

    hf_cfg = transformers.Gemma2Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, pad_token_id=0,
        **{"query_pre_attn_scalar": 24, "sliding_window": 12, **kw})
    hf = _random_hf(transformers.Gemma2ForCausalLM, hf_cfg)
    cfg = config_from_hf(hf.config, max_context=max_context)
    return hf, cfg, state_dict_from_hf(hf.state_dict(), cfg, hf.config)


@pytest.mark.parametrize("kw", [{}, {"attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
                                 {"attn_logit_softcapping": None, "final_logit_softcapping": None}])
def test_gemma2_logits_match_transformers(kw):
    """Gemma 2: Gemma 3's norms and GeGLU without q/k norms, one rotary base, the query scale folded into
    the query projection, and soft-capped attention scores and logits. The second case caps hard enough
    that the random model's scores and logits are well inside tanh's bend."""
    hf, cfg, sd = _gemma2_pair(**kw)
    caps = (kw.get("attn_logit_softcapping", 50.0), kw.get("final_logit_softcapping", 30.0))
    assert (cfg.arch, cfg.attn_softcap, cfg.final_softcap) == ("gemma2", *caps)
    assert (cfg.sliding_window, cfg.local_layers, cfg.local_rope_theta, cfg.qk_norm) == (12, [0, 2], None, False)
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    model = build_decoder(cfg, sd)
    _assert_logits_match(hf, model, 40)
    _assert_stateful_decoding_matches(hf, cfg, sd)
    ids = torch.randint(0, 300, (1, 20))
    for name in ("attn_softcap", "final_softcap") if caps[0] else ():  # either cap left out shows in the logits
        uncapped = build_decoder(ModelConfig.from_dict({**cfg.to_dict(), name: None}), sd)
        with torch.no_grad():
            model.full_logits = uncapped.full_logits = True
            diff = model(ids, torch.tensor([0]), model.empty_caches())[0] - \
                uncapped(ids, torch.tensor([0]), uncapped.empty_caches())[0]
        assert diff.abs().max() > 1e-2, name  # 100x the tolerance of the comparison with transformers
    _, cfg, _ = _gemma2_pair(max_context=12)
    assert (cfg.sliding_window, cfg.local_layers) == (None, None)  # within the window: plain layers


def _gpt2_pair(n_positions: int = 96, max_context: int = 64, **kw):
    import transformers

    hf_cfg = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=3, n_head=4, n_positions=n_positions,
                                     bos_token_id=0, eos_token_id=0, **kw)
    hf = _random_hf(transformers.GPT2LMHeadModel, hf_cfg)
    cfg = config_from_hf(hf.config, max_context=max_context)
    return hf, cfg, state_dict_from_hf(hf.state_dict(), cfg)


def test_gpt2_logits_match_transformers():
    """GPT-2: LayerNorm, learned positions, fused Conv1D q/k/v, tanh GELU, biases everywhere."""
    hf, cfg, sd = _gpt2_pair()
    assert (cfg.arch, cfg.layer_norm, cfg.learned_positions, cfg.gated_mlp) == ("gpt2", True, True, False)
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters()) - (96 - 64) * 64  # positions kept
    model = build_decoder(cfg, sd)
    assert model.pos_embeddings.weight.shape == (64, 64) and model.rope_cos is None
    _assert_logits_match(hf, model, 40)
    _assert_stateful_decoding_matches(hf, cfg, sd)  # decoding past the prompt uses the right position rows


def test_gpt2_context_and_unsupported_variants():
    from edgelm.errors import SourceError

    hf, cfg, sd = _gpt2_pair(n_positions=48, max_context=None)
    assert cfg.max_context == 48
    with pytest.raises(ValueError, match="learned positions for 48 tokens"):
        build_decoder(ModelConfig.from_dict({**cfg.to_dict(), "max_context": 64}), sd)
    for kw, needle in (({"activation_function": "quick_gelu"}, "activation 'quick_gelu'"),
                       ({"scale_attn_by_inverse_layer_idx": True}, "attention scaling")):
        with pytest.raises(SourceError, match=needle):
            _gpt2_pair(**kw)


def test_opt_logits_match_transformers():
    """OPT: GPT-2's shape with ReLU, separate q/k/v/out projections and a position table offset by 2."""
    import transformers

    from edgelm.errors import SourceError

    kw = dict(vocab_size=300, hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=96, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    hf = _random_hf(transformers.OPTForCausalLM, transformers.OPTConfig(**kw))
    cfg = config_from_hf(hf.config, max_context=64)
    assert (cfg.arch, cfg.layer_norm, cfg.learned_positions, cfg.gated_mlp, cfg.mlp_activation) == \
        ("opt", True, True, False, "relu")
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters()) - (96 + 2 - 64) * 64  # positions kept
    sd = state_dict_from_hf(hf.state_dict(), cfg, hf.config)
    _assert_logits_match(hf, build_decoder(cfg, sd), 40)
    _assert_stateful_decoding_matches(hf, cfg, sd)
    for change, needle in (({"do_layer_norm_before": False}, "post-LayerNorm blocks"),
                           ({"word_embed_proj_dim": 32}, "narrower"),
                           ({"activation_function": "quick_gelu"}, "'quick_gelu'")):
        with pytest.raises(SourceError, match=needle):
            config_from_hf(transformers.OPTConfig(**{**kw, **change}), max_context=64)


def attn_layer(cfg) -> int:
    """The first attention layer (LFM2's others are convolutions)."""
    return next(i for i in range(cfg.n_layers) if not cfg.is_conv(i))


def _run_stateful(model, ids, chunks):
    outs, pos = [], 0
    with torch.no_grad():
        for n in chunks:  # a length input: the positions in use after the call
            positions = torch.arange(pos + n) if model.length_input else torch.tensor([pos])
            outs.append(model(ids[:, pos:pos + n], positions))
            pos += n
    return torch.cat(outs, dim=1)


def _run_functional(model, ids, chunks):
    """:func:`_run_stateful` for a functional model: each call's new rows written into the caches by hand, as a
    runtime does."""
    outs, pos, caches = [], 0, model.empty_caches()
    with torch.no_grad():
        for n in chunks:
            logits, rows = model(ids[:, pos:pos + n], torch.tensor([pos]), caches)
            for cache, new in zip(caches, rows, strict=True):
                for c, r in zip(cache, new, strict=True):
                    c[:, :, pos:pos + n] = r
            outs.append(logits)
            pos += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize(("impl", "length_input"), STATEFUL_MODES)
def test_stateful_chunked_prefill_equals_full_forward(tiny_source, impl, length_input):
    ids = torch.randint(0, 256, (1, 24))
    full = build_decoder(tiny_source.config, tiny_source.state_dict)
    full.full_logits = True
    with torch.no_grad():
        ref, _ = full(ids, torch.tensor([0]), full.empty_caches())
    model = build_decoder(tiny_source.config, tiny_source.state_dict).make_stateful(impl)
    model.full_logits, model.length_input = True, length_input
    got = _run_stateful(model, ids, [10, 1, 1, 7, 5])
    assert torch.allclose(ref, got, atol=1e-4)


def test_functional_new_rows_are_the_cache_rows(tiny_model):
    ids = torch.randint(0, 256, (1, 6))
    caches = tiny_model.empty_caches()
    with torch.no_grad():
        _, rows = tiny_model(ids, torch.tensor([0]), caches)
    k, v = rows[0]
    assert k.shape == (1, tiny_model.cfg.n_kv_heads[0], 6, tiny_model.cfg.head_dim)
    stateful = build_decoder(tiny_model.cfg, tiny_model.state_dict()).make_stateful("plain")
    with torch.no_grad():
        stateful(ids, torch.tensor([0]))
    assert torch.allclose(stateful.layers[0].attn.k_cache[:, :, :6], k, atol=1e-6)


def test_per_layer_heads_and_ffn_widths():
    cfg = tiny_config(n_layers=3, n_heads=[4, 2, 4], n_kv_heads=[2, 1, 2], ffn_dim=[128, 40, 96])
    model = build_decoder(cfg)
    assert model.layers[1].attn.wq.out_features == 2 * cfg.head_dim
    assert model.layers[1].mlp.w_up.out_features == 40
    model.full_logits = True
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        ref, _ = model(ids, torch.tensor([0]), model.empty_caches())
        et = build_decoder(cfg, model.state_dict()).make_stateful("executorch")
        et.full_logits = True
        got = _run_stateful(et, ids, [5, 4])
    assert torch.allclose(ref, got, atol=1e-4)


def test_config_validation_and_roundtrip():
    cfg = tiny_config()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="grouped"):
        tiny_config(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="entries"):
        tiny_config(ffn_dim=[1, 2, 3])
    head = cfg.head_dim
    for bad in (3, head + 2, 0):
        with pytest.raises(ValueError, match="rotary_dim must be even and within the head"):
            tiny_config(rotary_dim=bad)
    assert tiny_config(rotary_dim=head - 2).rotary_dim == head - 2
    with pytest.raises(ValueError, match="nope_layers .* need indices below"):
        tiny_config(nope_layers=[cfg.n_layers])
    assert tiny_config(nope_layers=[1, 0]).nope_layers == [0, 1]
