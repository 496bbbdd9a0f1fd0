"""The CLI as a user meets it: real subprocesses, exit codes, no tracebacks."""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys

import pytest

from edgelm.bench import DEFAULT_PROMPT
from edgelm.runtime.hugepages import huge_pages_env

from .conftest import convert_bundle


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


def test_convert_a_hugging_face_folder(tmp_path):
    """The user's usual source: a transformers folder (config.json, safetensors, tokenizer files).

    A Mistral config with a sliding window shorter than the context, and YaRN: the bundle keeps the
    context asked for, and the lowered file passes the parity gate against the canonical decoder,
    which ``test_model`` checks against transformers for both features.
    """
    import torch
    import transformers
    from tokenizers import Tokenizer

    from edgelm.converters.sources import TINY_CHAT_TEMPLATE, tiny_tokenizer_json

    folder = tmp_path / "hf-model"
    cfg = transformers.MistralConfig(
        vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=40, eos_token_id=256,
        rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128})
    torch.manual_seed(0)
    transformers.MistralForCausalLM(cfg).save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tiny_tokenizer_json()),
                                         eos_token="<|im_end|>", chat_template=TINY_CHAT_TEMPLATE
                                         ).save_pretrained(folder)
    out = tmp_path / "bundle"
    edgelm("convert", folder, "-f", "onnx", "--max-context", "64", "-o", out, check=True)
    manifest = json.loads((out / "edgelm.json").read_text())
    assert manifest["max_context"] == 64 and manifest["model"]["sliding_window"] == 40
    assert "context     64 tokens (sliding window of 40 in 2 of 2 layers)" in edgelm("inspect", out, check=True).stdout
    assert manifest["model"]["rope_scaling"]["rope_type"] == "yarn"
    assert manifest["verification"]["parity"]["passed"] is True
    run = edgelm("run", out, "hello", "--max-new-tokens", "5", "--stats", check=True)
    assert "tokens/s" in run.stderr + run.stdout


def _random_causal_lm(arch: str):
    import transformers

    if arch == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=260, n_embd=64, n_layer=2, n_head=4, n_positions=96, bos_token_id=256, eos_token_id=256))
    if arch == "gemma3":
        return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(  # one KV head, as Gemma 3 270M
            vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, max_position_embeddings=256,
            sliding_window=12, layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
            bos_token_id=256, eos_token_id=256))
    if arch == "gemma2":  # soft-capped scores and logits (caps low enough to bend the random model's)
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, max_position_embeddings=256,
            sliding_window=12, attn_logit_softcapping=5.0, final_logit_softcapping=8.0, pad_token_id=0,
            bos_token_id=256, eos_token_id=256))
    if arch == "smollm3":  # NoPE: its second layer has no rotary embedding
        return transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(
            vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, no_rope_layer_interval=2, tie_word_embeddings=True,
            pad_token_id=0, bos_token_id=256, eos_token_id=256))
    if arch == "granite":  # scaled embedding, scores, block outputs and logits (Granite 3's multipliers)
        return transformers.GraniteForCausalLM(transformers.GraniteConfig(
            vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, embedding_multiplier=12.0, attention_multiplier=0.02,
            residual_multiplier=0.22, logits_scaling=8.0, tie_word_embeddings=True, pad_token_id=0,
            bos_token_id=256, eos_token_id=256))
    if arch == "glm":  # as GLM-Edge: interleaved RoPE on half of each head, q/k/v biases, fused gate_up_proj
        return transformers.GlmForCausalLM(transformers.GlmConfig(
            vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=256,
            eos_token_id=256))
    if arch == "stablelm":  # as StableLM 2: LayerNorm, RoPE on a quarter of each head, q/k/v biases
        return transformers.StableLmForCausalLM(transformers.StableLmConfig(
            vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, partial_rotary_factor=0.25, use_qkv_bias=True,
            pad_token_id=0, bos_token_id=256, eos_token_id=256))
    if arch == "opt":  # GPT-2's shape with ReLU and a position table offset by 2
        return transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=260, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=96, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=256, eos_token_id=256))
    if arch == "phi":  # as Phi-2: parallel attention and MLP on one LayerNorm, partial RoPE, a biased LM head
        return transformers.PhiForCausalLM(transformers.PhiConfig(
            vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=256,
            eos_token_id=256))
    if arch == "gpt_neox":  # as Pythia: parallel attention and MLP, exact GELU, per-head fused q/k/v
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, partial_rotary_factor=0.25, pad_token_id=0, bos_token_id=256,
            eos_token_id=256))
    if arch == "olmo2":  # norms on the attention and MLP outputs only, q/k norms over the whole projection
        return transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
            vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=256, eos_token_id=256))
    if arch == "olmo3":  # OLMo 2 with a 12-token window on its local layers, which keep their own RoPE base
        return transformers.Olmo3ForCausalLM(transformers.Olmo3Config(
            vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, sliding_window=12,
            layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=256, eos_token_id=256,
            rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 50000.0,
                                                "original_max_position_embeddings": 128},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}))
    if arch == "exaone4":  # OLMo 2's norms, per-head q/k norms, a 12-token window, a global layer without RoPE
        return transformers.Exaone4ForCausalLM(transformers.Exaone4Config(
            vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=12,
            layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=256, eos_token_id=256))
    if arch == "hunyuan":  # per-head q/k norms after the rotary embedding, NTK-alpha RoPE
        return transformers.HunYuanDenseV1ForCausalLM(transformers.HunYuanDenseV1Config(
            vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=256,
            eos_token_id=256, rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0,
                                               "rope_theta": 10000.0}))
    if arch == "gemma":  # Gemma 1: GeGLU with the exact GELU its released configs name, one KV head
        return transformers.GemmaForCausalLM(transformers.GemmaConfig(
            vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, hidden_act="gelu", max_position_embeddings=256, pad_token_id=0,
            bos_token_id=256, eos_token_id=256))
    if arch == "lfm2":  # gated short-convolution layers between attention layers with per-head q/k norms
        return transformers.Lfm2ForCausalLM(transformers.Lfm2Config(
            vocab_size=260, hidden_size=64, intermediate_size=144, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, layer_types=["conv", "full_attention", "conv"], block_multiple_of=16,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=256, eos_token_id=256))
    if arch == "phi3":  # as Phi-4-mini: RoPE on 3/4 of each head, LongRoPE, tied embedding, fused qkv
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(
            vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=128,
            partial_rotary_factor=0.75, tie_word_embeddings=True, pad_token_id=0, bos_token_id=256,
            eos_token_id=256, rope_scaling={"type": "longrope", "short_factor": [1.0, 1.2, 1.7, 2.5, 4.0, 6.0],
                                            "long_factor": [1.5, 2.6, 4.1, 9.0, 17.0, 30.0]}))
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=96, tie_word_embeddings=True,
        bos_token_id=256, eos_token_id=256))


ALL_FORMATS = ("pte", "onnx", "tflite")


def _random_folder(tmp_path, arch):
    """A transformers folder of a random ``arch`` model with the tiny tokenizer, and the model."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    from edgelm.converters.sources import tiny_tokenizer_json

    folder = tmp_path / arch
    torch.manual_seed(0)
    hf = _random_causal_lm(arch).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from init, so greedy tokens depend on the prompt
    hf.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tiny_tokenizer_json()),
                                         eos_token="<|im_end|>").save_pretrained(folder)
    return folder, hf


def _generates_like_transformers(engine, hf) -> tuple[list[int], list[int]]:
    """The bundle passed its parity gate tightly and generates transformers' own 24 greedy tokens."""
    import torch

    parity = engine.manifest.verification["parity"]
    assert parity["passed"] and parity["max_abs_err"] < 1e-4, parity  # GPT-2's tanh GELU is XNNPACK's too
    ids = engine.encode_prompt("The lighthouse keeper")
    got = list(engine.generate_ids(ids, max_new_tokens=24))
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=24, do_sample=False, eos_token_id=256, pad_token_id=0)
    want = [t for t in want[0, len(ids):].tolist() if t != 256]
    assert got == want and len(got) > 8, engine.manifest.format
    return ids, got


# Every format for each new kind of graph; ONNX alone (the quickest) for families whose graph is one of
# those with other weights (Granite and GLM are Llamas once folded) or other settings of the same ops
# (Phi: Pythia's parallel block with one norm for both branches).
@pytest.mark.parametrize("arch,formats", [
    *(pytest.param(arch, ALL_FORMATS, id=arch) for arch in ("gpt2", "qwen3", "gemma3", "phi3", "gemma2", "smollm3",
                                                            "gpt_neox", "olmo2", "hunyuan", "lfm2")),
    *(pytest.param(arch, ("onnx",), id=arch) for arch in ("granite", "glm", "stablelm", "opt", "exaone4", "gemma",
                                                          "olmo3", "phi")),
])
def test_convert_a_folder_to_every_format(tmp_path, arch, formats):
    """GPT-2 (learned positions, LayerNorm, GELU MLP, Conv1D weights), Qwen3 (an RMSNorm per query and key
    head), Gemma 3 (sandwich norms, GeGLU, two rotary bases, a 12-token sliding window on the local layers),
    Phi-4-mini's shape (partial rotary, LongRoPE), Gemma 2 (soft-capped scores and logits), SmolLM3 (layers
    without RoPE), Pythia's (parallel attention and MLP), OLMo 2 (norms after attention and MLP only, q/k norms
    over all heads), Hunyuan (q/k norms after RoPE), LFM2 (short-convolution layers); and in ONNX Granite
    (multipliers), GLM-Edge's shape (interleaved partial RoPE), StableLM 2's (LayerNorm, partial RoPE), OPT
    (ReLU, offset positions), EXAONE 4 (OLMo 2's norms, a window, NoPE), Gemma 1 (exact GELU), Phi-2's (Pythia's
    block, one shared norm) and OLMo 3 (a window, a RoPE per layer type) from transformers folders: each bundle
    generates transformers' own greedy tokens."""
    from edgelm.runtime import Engine

    folder, hf = _random_folder(tmp_path, arch)
    out = tmp_path / "bundles"
    edgelm("convert", folder, "-f", "all" if formats == ALL_FORMATS else formats[0], "--max-context", "64", "-o",
           out if formats == ALL_FORMATS else out / formats[0], check=True)
    shown = {"phi3": "llama: 2 layers, dim 64, vocab 260, 0.1 M parameters; longrope RoPE scaling; "
                     "RoPE on 12 of 16 head dims\n",
             "gemma2": "parameters; soft caps: attention 5.0, logits 8.0\n",
             "smollm3": "parameters; no RoPE in 1 of 2 layers\n",
             "glm": "parameters; RoPE on 8 of 16 head dims\n",
             "stablelm": "parameters; RoPE on 4 of 16 head dims\n", "phi": "parameters; RoPE on 8 of 16 head dims\n",
             "gpt_neox": "parameters; RoPE on 4 of 16 head dims\n", "exaone4": "parameters; no RoPE in 1 of 2 layers\n",
             "olmo3": "parameters; yarn RoPE scaling\n",
             "lfm2": "parameters; 2 of 3 layers are 3-tap convolutions\n",
             }.get(arch, "parameters\n")
    assert shown in edgelm("inspect", out / "onnx", check=True).stdout
    for fmt in formats:
        engine = Engine.load(out / fmt, threads=2)
        canonical = {"phi3": "llama", "smollm3": "llama", "granite": "llama", "glm": "llama", "olmo3": "olmo2"}
        assert engine.manifest.model.arch == canonical.get(arch, arch)
        ids, got = _generates_like_transformers(engine, hf)
        if arch == "lfm2":  # the cache rewinds: rows past a position (rejected draft tokens) are rewritten, not read
            import numpy as np

            b, n = engine.backend, len(ids)
            clean = b.prefill(np.array(ids + got[:4], dtype=np.int64), 0)
            b.prefill(np.array(ids, dtype=np.int64), 0)
            b.prefill(np.array([40, 41, 42, 43, 44], dtype=np.int64), n)
            np.testing.assert_allclose(b.prefill(np.array(got[:4], dtype=np.int64), n), clean, atol=1e-4)


def test_portable_pte_plans_no_second_cache(tmp_path):
    """A portable .pte's in-place cache writes are also the graph's buffer-mutation outputs; ExecuTorch's planner
    used to give each of them room in the activation arena, a second copy of the whole cache's size that the
    runtime allocated (94 MB for SmolLM2 at 2048). A four-layer model with a long context, where the
    cache dwarfs the activations: the arena now holds less than half the cache (two layers' rows at most)."""
    from edgelm.converters.compress.checkpoint import save_checkpoint
    from edgelm.converters.sources import load_tiny

    ckpt = save_checkpoint(load_tiny(max_context=1024, n_layers=4), tmp_path / "ckpt")
    out = convert_bundle(tmp_path / "portable", source=str(ckpt), pte_attention="portable", max_prefill=16,
                         verify=False, evaluate=False)
    cache = _planned_cache_bytes(out / "model.pte")
    assert cache == 4 * 2 * 2 * 16 * 1024 * 4  # layers x (K, V) x KV heads x head dim x positions x fp32
    arenas = _activation_arena_bytes(out / "model.pte")
    assert all(a < cache / 2 for a in arenas.values()), (arenas, cache)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "lfm2"])
def test_portable_pte_attention_for_other_graphs(tmp_path, arch):
    """--pte-attention portable on the graphs whose attention differs: Gemma 2's soft-capped scores, Gemma 3's
    sliding window and single KV head, LFM2's convolution layers (their cache rows in the plain layout)."""
    from edgelm.runtime import Engine

    folder, hf = _random_folder(tmp_path, arch)
    out = tmp_path / "pte"
    edgelm("convert", folder, "-f", "pte", "--pte-attention", "portable", "--max-context", "64", "-o", out,
           check=True)
    engine = Engine.load(out, threads=2)
    assert engine.manifest.io["attention"] == "portable"
    _generates_like_transformers(engine, hf)


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


def test_template_vars_are_checked(tiny_pte):
    assert_clean_error(edgelm("run", tiny_pte, "hi", "--template-var", "enable_thinking"), "KEY=VALUE")
    assert_clean_error(edgelm("run", tiny_pte, "hi", "--raw", "--template-var", "enable_thinking=false"),
                       "needs --chat")
    edgelm("run", tiny_pte, "hi", "-n", "2", "--template-var", "enable_thinking=false", check=True)


def test_prompt_longer_than_context(tiny_pte):
    assert_clean_error(edgelm("run", tiny_pte, "z" * 500, "-n", "4"), "context window")
    proc = edgelm("run", tiny_pte, "z" * 500, "-n", "4", "--truncate")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args,needle", [(["run", "nowhere", "hi"], "does not exist"),
                                         (["inspect", "nowhere"], "does not exist")])
def test_missing_bundle(args, needle):
    assert_clean_error(edgelm(*args), needle)


def test_convert_with_target_profiles_records_their_choices(tmp_path):
    from edgelm.targets import load_profile

    # the tiny model has random weights: int4 hurts it far more than a trained model, so the
    # quality gates are relaxed here; this test is about the profiles, tests/test_quant.py about quality
    relaxed = ("--eval-windows", "1", "--min-top1", "0.2", "--max-ppl-increase", "2")
    out = tmp_path / "pi5"
    proc = edgelm("convert", "builtin:tiny", "--target", "raspberry-pi-5", "-o", out, *relaxed, check=True)
    assert "wrote" in proc.stdout
    manifest = json.loads(edgelm("inspect", out, "--json", check=True).stdout)
    profile = load_profile("raspberry-pi-5")
    assert manifest["target"]["name"] == "raspberry-pi-5"
    assert manifest["format"] == profile.convert.formats[0]
    assert manifest["scheme"] == profile.convert.scheme == "w8a8"
    assert manifest["max_context"] == profile.convert.max_context
    assert edgelm("run", out, "hello", "-n", "4", check=True).returncode == 0
    # explicit flags override the profile; an int8 KV cache for an aarch64 target decodes over the int8 codes
    # with ExecuTorch's quantized kernel (test_kv_cache_int8_for_pte_and_a_clear_refusal_for_tflite: the host's)
    out2 = tmp_path / "android"
    edgelm("convert", "builtin:tiny", "--target", "android-arm64", "-q", "w4a8", "--max-context", "64", "-o", out2,
           "--kv-cache", "int8", *relaxed, check=True)
    m2 = json.loads(edgelm("inspect", out2, "--json", check=True).stdout)
    assert m2["io"]["kv_cache_decode"] == "int8 codes"
    ops = _operators(out2 / "model.pte")
    assert "llama::custom_quantized_sdpa" in ops["decode"] and "llama::custom_quantized_sdpa" not in ops["prefill"]
    android = load_profile("android-arm64")
    assert m2["scheme"] == "w4a8" != android.convert.scheme and m2["max_context"] == 64
    assert m2["io"]["quantization"]["group_size"] == android.convert.group_size
    assert m2["io"]["quantization"]["int4_symmetric"] is False  # groups with a float minimum by default
    assert m2["target"]["name"] == "android-arm64" and m2["format"] == android.convert.formats[0]
    assert edgelm("run", out2, "hello", "-n", "4", check=True).returncode == 0


def test_target_errors_are_clean(tmp_path):
    assert_clean_error(edgelm("convert", "builtin:tiny", "--target", "raspberry-pi-9", "-o", tmp_path / "o"),
                       "raspberry-pi-9")
    bad = tmp_path / "board.toml"
    bad.write_text('extends = "raspberry-pi-5"\n[convert]\nthreads = 0\n')
    assert_clean_error(edgelm("convert", "builtin:tiny", "--target", bad, "-o", tmp_path / "o"),
                       "convert.threads")
    out = edgelm("targets", "list", check=True).stdout
    assert "raspberry-pi-4" in out and "x86-64" in out
    assert "Cortex-A76" in edgelm("targets", "show", "raspberry-pi-5", check=True).stdout


def test_bench_prints_json_and_rejects_bad_combinations(tiny_pte):
    proc = edgelm("bench", tiny_pte, "--runs", "1", "--warmup", "0", "-n", "4", "--json", "-", check=True)
    report = json.loads(proc.stdout)  # stdout holds the JSON alone, no table
    [row] = report["rows"]
    assert row["format"] == "pte" and row["new_tokens"] == 4 and row["decode_tps"]["median"] > 0
    assert row["weight_cache"] is True  # prefill and decode shared one packed copy (README: Memory)
    assert report["machine"]["cores"] >= 1
    if huge_pages_env({}) is not None:  # the command re-executed itself with the glibc tunable: so did its rows
        assert report["machine"]["huge_pages"].startswith("on"), report["machine"]
    assert_clean_error(edgelm("bench"), "give at least one bundle")
    assert_clean_error(edgelm("bench", tiny_pte, "--eager", "--device", "local"), "run on this machine only")
    assert_clean_error(edgelm("bench", tiny_pte, "--rounds", "2", "--device", "local"), "run on this machine only")


def test_bench_rounds_run_the_rows_in_turns(tiny_pte):
    """--rounds: every row runs once per round, rows in turns; a timing's median is that of the rounds' medians."""
    proc = edgelm("bench", tiny_pte, tiny_pte, "--rounds", "2", "--runs", "1", "--warmup", "0", "-n", "4", "--json",
                  "-", check=True)
    turns = re.findall(r"running bundle .*\(round (\d) of 2\)", proc.stderr)
    assert turns == ["1", "1", "2", "2"], proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert len(rows) == 2
    for row in rows:
        for k in ("ttft_s", "decode_tps"):
            medians = row["rounds"][k]
            assert len(medians) == 2 and row[k]["median"] == pytest.approx(sum(medians) / 2)
            assert row[k]["min"] <= min(medians) and row[k]["max"] >= max(medians)


def test_bench_samples_when_asked(tiny_pte):
    from edgelm.runtime import Engine
    from edgelm.sampling import SamplingConfig

    proc = edgelm("bench", tiny_pte, "--temperature", "1.0", "--top-p", "0.9", "--seed", "3", "--runs", "1",
                  "--warmup", "0", "-n", "8", "--threads", "1", "--json", "-", check=True)
    [row] = json.loads(proc.stdout)["rows"]
    assert row["name"].endswith(", sampled (temperature 1, top-p 0.9)")
    engine = Engine.load(tiny_pte, threads=1)
    ids = engine.encode_prompt(DEFAULT_PROMPT, chat=True)
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, seed=3)
    assert row["tokens"] == list(engine.generate_ids(ids, max_new_tokens=8, sampling=cfg, ignore_eos=True))
    assert row["tokens"] != list(engine.generate_ids(ids, max_new_tokens=8, ignore_eos=True))
    assert_clean_error(edgelm("bench", tiny_pte, "--top-p", "0.9"), "give --temperature too")


def test_bench_small_pages_rows(tiny_pte):
    proc = edgelm("bench", tiny_pte, "--small-pages", "--runs", "1", "--warmup", "0", "-n", "4", "--json", "-",
                  check=True)
    huge, small = json.loads(proc.stdout)["rows"]
    assert small["name"] == huge["name"] + ", small pages"
    assert small["huge_pages"].startswith(("off", "unknown")), small
    if huge_pages_env({}) is not None:
        assert huge["huge_pages"].startswith("on"), huge


def test_int4_symmetric_flag_reaches_the_lowering(tmp_path):
    out = tmp_path / "sym"
    edgelm("convert", "builtin:tiny", "-f", "onnx", "-q", "w4a8", "--int4-symmetric", "-o", out,
           "--eval-windows", "1", "--min-top1", "0.2", "--max-ppl-increase", "2", check=True)
    m = json.loads(edgelm("inspect", out, "--json", check=True).stdout)
    assert m["io"]["quantization"]["int4_symmetric"] is True
    assert m["verification"]["lowering"]["quantization"]["zero_point"] == "symmetric"


def _planned_cache_bytes(pte) -> int:
    """The bytes a .pte plans for its mutable buffers (the KV cache), shared by its methods: read from the
    program itself (ExecuTorch's own deserializer), not from edgelm's manifest."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes())
    plan = {p.name: p.non_const_buffer_sizes for p in getattr(program, "program", program).execution_plan}
    assert plan["prefill"][-1] == plan["decode"][-1]  # one shared buffer: the mutable ones
    return plan["decode"][-1]


def _activation_arena_bytes(pte) -> dict[str, int]:
    """Each method's planned activation memory (ExecuTorch's arena 1; arena 2 holds the shared cache)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes())
    return {p.name: p.non_const_buffer_sizes[1] for p in getattr(program, "program", program).execution_plan
            if p.name in ("prefill", "decode")}


def _operators(pte) -> dict[str, set[str]]:
    """Each method's operator names, read from the program itself."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes())
    return {p.name: {op.name for op in p.operators} for p in getattr(program, "program", program).execution_plan}


def test_kv_cache_int8_for_pte_and_a_clear_refusal_for_tflite(tiny_pte, tmp_path):
    """--kv-cache int8: the .pte plans an int8 cache of the size edgelm estimates (3x smaller than fp32 here),
    the conversion is judged like a quantized one, and inspect and run work. Prefill attends over dequantized
    rows; so does decode on an x86 host, and over the int8 codes with ExecuTorch's quantized kernel on aarch64
    (lowering.executorch.int8_decode_kernel; an aarch64 target: test_convert_with_target_profiles_...).
    TFLite refuses it before any work (ONNX holds one: tests/test_onnx.py::test_int8_kv_cache)."""
    from edgelm.bundle import load_manifest
    from edgelm.targets import kv_cache_bytes

    out = tmp_path / "kv8"
    edgelm("convert", "builtin:tiny", "-o", out, "--kv-cache", "int8", "--eval-windows", "2", check=True)
    _, m = load_manifest(out)
    assert m.io["kv_cache_dtype"] == "int8"
    parity, quality = m.verification["parity"], m.verification["quality"]
    assert parity["passed"] and quality["passed"] and quality["top1_agreement"] >= 0.9
    assert parity["max_abs_err"] > 1e-3  # the int8 cache is in use (the fp32 pte is within ~1e-5)
    ops = _operators(out / "model.pte")
    assert "llama::custom_quantized_sdpa" not in ops["prefill"] and "llama::custom_sdpa" in ops["prefill"]
    kernel = platform.machine() in ("aarch64", "arm64")  # x86 dequantizes; aarch64 attends over the codes
    decode = "int8 codes" if kernel else "dequantized rows"
    assert m.io["kv_cache_decode"] == decode
    assert ("llama::custom_quantized_sdpa" in ops["decode"]) == kernel
    assert ("llama::custom_sdpa" in ops["decode"]) == (not kernel)
    cfg, ctx = m.model, m.max_context
    int8, fp32 = kv_cache_bytes(cfg, ctx, kv_cache="int8"), kv_cache_bytes(cfg, ctx)
    assert _planned_cache_bytes(out / "model.pte") == int8
    assert _planned_cache_bytes(tiny_pte / "model.pte") == fp32 > 3 * int8
    assert (f"kv cache    int8 (asymmetric rows), {int8 / 1e6:.1f} MB for {ctx} positions; decode attends over {decode}"
            in edgelm("inspect", out, check=True).stdout)
    assert edgelm("run", out, "hello", "-n", "8", check=True).stdout.strip()
    bench = json.loads(edgelm("bench", out, "--runs", "1", "--warmup", "0", "-n", "4", "--json", "-",
                              check=True).stdout)
    assert bench["rows"][0]["name"] == "edgelm pte fp32, int8 KV cache"
    deep = edgelm("evaluate", out, "--window", "120", "--eval-windows", "1", check=True).stdout  # one long window
    assert "over 120 tokens" in deep and float(re.search(r"top-1 ([\d.]+)", deep).group(1)) >= 0.9
    for fmt in ("tflite", "all"):
        assert_clean_error(edgelm("convert", "builtin:tiny", "-f", fmt, "--kv-cache", "int8", "-o", tmp_path / fmt),
                           "tflite format cannot hold an int8 KV cache", "built for pte and onnx")
        assert not (tmp_path / fmt).exists()




def test_portable_pte_with_an_int8_kv_cache(tiny_source, tmp_path):
    """--pte-attention portable --kv-cache int8 (a Raspberry Pi 4's .pte with a 3.7x smaller cache): symmetric
    rows, codes and a scale per position and head, no zero point. The program holds no llama:: operator, and XNNPACK
    runs the attention and all of the new rows' quantization but its final cast. It
    plans the cache size edgelm estimates, passes the gates with the cache in use, and its logits are those of the
    canonical decoder's portable int8 cache in PyTorch: token by token over the whole context (XNNPACK's own int8
    convert, tried for the cast, went wrong at the 17th position), then through chunked prefill and decode."""
    import numpy as np
    import torch

    from edgelm.bundle import load_manifest
    from edgelm.converters.model import build_decoder
    from edgelm.runtime import Engine
    from edgelm.targets import kv_cache_bytes

    out = tmp_path / "kv8"
    edgelm("convert", "builtin:tiny", "-o", out, "--pte-attention", "portable", "--kv-cache", "int8",
           "--max-prefill", "16", "--eval-windows", "2", check=True)
    _, m = load_manifest(out)
    assert m.io["kv_cache_dtype"] == "int8" and m.io["kv_cache_rows"].startswith("symmetric")
    parity, quality = m.verification["parity"], m.verification["quality"]
    assert parity["passed"] and quality["passed"] and quality["top1_agreement"] >= 0.9
    assert parity["max_abs_err"] > 1e-3  # the int8 cache is in use
    ops = _operators(out / "model.pte")
    for method in ("prefill", "decode"):
        assert not any(op.startswith("llama::") for op in ops[method]), ops[method]
        assert not {"aten::bmm", "aten::_softmax", "aten::abs", "aten::floor", "aten::max"} & set(ops[method])
    cfg, ctx = m.model, m.max_context
    int8 = kv_cache_bytes(cfg, ctx, kv_cache="int8", pte_attention="portable")
    assert _planned_cache_bytes(out / "model.pte") == int8 < kv_cache_bytes(cfg, ctx, kv_cache="int8")
    assert (f"kv cache    int8 (symmetric rows), {int8 / 1e6:.1f} MB for {ctx} positions; decode attends over int8 "
            "codes, scales folded" in edgelm("inspect", out, check=True).stdout)
    ref = build_decoder(tiny_source.config, tiny_source.state_dict).make_stateful("portable", "int8")
    ref.length_input = True
    backend = Engine.load(out, threads=2).backend
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(1))
    every_position = [(i, 1) for i in range(ctx)]
    chunked = [(0, 14), (14, 11), (25, 1), (26, 1), (27, 16), (43, 1)]  # prefill in chunks, then decode
    with torch.no_grad():
        for start, n in every_position + chunked:
            want = ref(ids[:, start:start + n], torch.arange(start + n)).numpy().reshape(-1)
            chunk = ids[0, start:start + n].numpy()
            got = backend.decode(int(chunk[0]), start) if n == 1 else backend.prefill(chunk.astype(np.int64), start)
            np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"positions {start}..{start + n - 1}")
    assert edgelm("run", out, "hello", "-n", "8", check=True).stdout.strip()


_LOADED_KERNELS = """
import sys
from edgelm.runtime import Engine
engine = Engine.load(sys.argv[1], threads=1)
tokens = list(engine.generate_ids(list(range(5, 40)), max_new_tokens=engine.max_context - 35, ignore_eos=True))
print(" ".join(map(str, tokens)))
print("executorch.extension.llm.custom_ops.custom_ops" in sys.modules)
"""


def test_portable_pte_attention_runs_without_the_llama_kernels(tiny_pte, tmp_path):
    """--pte-attention portable (what the ARMv8.0 profiles pick: the llama:: kernels of ExecuTorch's aarch64
    wheel die with SIGILL on a Cortex-A72): the program holds no llama:: operator, writes its cache with an
    in-place index_put_, and the runtime never loads the llama:: kernels; its greedy tokens are the custom-kernel
    bundle's."""
    out = tmp_path / "portable"
    edgelm("convert", "builtin:tiny", "-o", out, "--pte-attention", "portable", "--max-prefill", "16", check=True)
    ops = _operators(out / "model.pte")
    for method in ("prefill", "decode"):
        assert not any(op.startswith("llama::") for op in ops[method]), ops[method]
        assert "aten::index_put_" in ops[method]
        assert not {"aten::bmm", "aten::_softmax"} & set(ops[method]), ops[method]  # XNNPACK runs the attention
    assert "llama::custom_sdpa" in _operators(tiny_pte / "model.pte")["decode"]
    assert "attention   portable: plain ops" in edgelm("inspect", out, check=True).stdout
    runs = {}
    for name, bundle in (("portable", out), ("custom", tiny_pte)):
        proc = subprocess.run([sys.executable, "-c", _LOADED_KERNELS, str(bundle)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        runs[name] = proc.stdout.split("\n")[:2]
    assert runs["portable"][0] == runs["custom"][0] and len(runs["portable"][0].split()) == 128 - 35  # to the end
    assert runs["portable"][1] == "False" and runs["custom"][1] == "True"
    from edgelm.errors import BundleError
    from edgelm.runtime import Engine

    engine = Engine.load(out, threads=1)
    with pytest.raises(BundleError, match="past the context window"):  # its position input cannot be cut short
        engine.backend.decode(5, 128)
    from edgelm.bench import row_name_and_size

    assert row_name_and_size(engine)[0] == "edgelm pte fp32, portable attention"  # bench rows tell them apart
    assert_clean_error(edgelm("convert", "builtin:tiny", "-o", tmp_path / "bad", "--pte-attention", "fast"),
                       "'fast' is not one of 'custom', 'portable'")
