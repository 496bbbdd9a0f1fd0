"""Compression on the tiny model: structured pruning (exact where the method guarantees it),
unstructured sparsity, low-rank SVD, distillation with checkpoint/resume, and the
`edgelm compress` -> `edgelm convert` round trip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from edgelm.converters.compress import CompressionError
from edgelm.converters.compress.distill import DistillConfig, distill, evaluate, teacher_targets
from edgelm.converters.compress.importance import forward_full
from edgelm.converters.compress.lowrank import factor, is_smaller, low_rank
from edgelm.converters.compress.prune import (
    drop_layers,
    keep_heads,
    magnitude_prune,
    parameter_count,
    sparsity_of,
    structured_prune,
)
from edgelm.converters.model import LowRankLinear, build_decoder
from edgelm.converters.sources import load_tiny

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def src():
    return load_tiny(n_layers=3)


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (4, 32), generator=g).tolist()


def tokens(n=24, seed=2):
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(seed))


def logits(cfg, sd, x):
    with torch.no_grad():
        return forward_full(build_decoder(cfg, sd), x)


def test_pruning_dead_ffn_channels_is_exact(src, calib):
    sd = dict(src.state_dict)
    dead = {}
    for i in range(3):  # 32 of 128 channels per layer write nothing (zero down-projection columns)
        w = sd[f"layers.{i}.mlp.w_down.weight"].clone()
        dead[i] = torch.randperm(128, generator=torch.Generator().manual_seed(i))[:32]
        w[:, dead[i]] = 0
        sd[f"layers.{i}.mlp.w_down.weight"] = w
    cfg, new, layer_map, report = structured_prune(src.config, sd, calib, ffn=0.25, multiple_of=1)
    assert cfg.ffn_dim == [96, 96, 96] and report["ffn"]["after"] == [96] * 3 and layer_map == [0, 1, 2]
    assert new["layers.0.mlp.w_gate.weight"].shape == (96, 64) and new["layers.0.mlp.w_down.weight"].shape == (64, 96)
    x = tokens()
    torch.testing.assert_close(logits(cfg, new, x), logits(src.config, sd, x), atol=1e-5, rtol=1e-5)
    assert parameter_count(build_decoder(cfg, new)) == cfg.num_parameters()


@pytest.mark.parametrize("granularity", ["query", "group"])
def test_pruning_silent_heads_is_exact_and_gqa_consistent(src, calib, granularity):
    sd = dict(src.state_dict)  # 4 query heads over 2 KV heads: heads 0,1 -> KV 0; heads 2,3 -> KV 1
    silent = [1, 2] if granularity == "query" else [2, 3]  # one head per group, or all of group 1
    for i in range(3):
        wo = sd[f"layers.{i}.attn.wo.weight"].clone()
        for h in silent:
            wo[:, h * 16:(h + 1) * 16] = 0
        sd[f"layers.{i}.attn.wo.weight"] = wo
    cfg, new, _, report = structured_prune(src.config, sd, calib, heads=0.5, granularity=granularity)
    assert cfg.n_heads == [2, 2, 2]
    assert cfg.n_kv_heads == ([2, 2, 2] if granularity == "query" else [1, 1, 1])
    assert new["layers.1.attn.wq.weight"].shape == (32, 64)
    assert new["layers.1.attn.wk.weight"].shape == (cfg.n_kv_heads[1] * 16, 64)
    x = tokens()
    torch.testing.assert_close(logits(cfg, new, x), logits(src.config, sd, x), atol=1e-5, rtol=1e-5)


def test_pruning_heads_of_a_model_with_whole_projection_qk_norms(calib):
    """OLMo 2's q/k norms span all heads: pruning keeps the kept heads' share of their weights."""
    src = load_tiny(n_layers=2, arch="olmo2")
    cfg, new, _, _ = structured_prune(src.config, src.state_dict, calib, heads=0.5, granularity="group")
    assert cfg.n_heads == [2, 2] and cfg.n_kv_heads == [1, 1]
    assert new["layers.0.attn.q_norm.weight"].shape == (32,) and new["layers.0.attn.k_norm.weight"].shape == (16,)
    model = build_decoder(cfg, new)
    assert parameter_count(model) == cfg.num_parameters()
    assert torch.isfinite(forward_full(model, tokens())).all()


def test_pruning_a_model_with_convolution_layers(calib):
    """LFM2: a dropped layer takes its place in conv_layers with it; heads are pruned in attention layers only;
    the convolution layers' FFNs and output projections prune and factor like any other."""
    src = load_tiny(n_layers=4, arch="lfm2", conv_layers=[0, 1, 3], conv_kernel=3, n_heads=[2, 2, 4, 2],
                    n_kv_heads=2)
    cfg, new, layer_map, report = structured_prune(src.config, src.state_dict, calib, drop=1, heads=0.5, ffn=0.25,
                                                   granularity="group", multiple_of=1)
    [gone] = report["dropped_layers"]
    assert layer_map == [i for i in range(4) if i != gone] and cfg.n_layers == 3
    assert cfg.conv_layers == [new_i for new_i, old in enumerate(layer_map) if old in (0, 1, 3)]
    assert [cfg.n_heads[i] for i in cfg.conv_layers] == [2] * len(cfg.conv_layers)  # untouched
    assert [h for i, h in enumerate(cfg.n_heads) if not cfg.is_conv(i)] == [2] * (3 - len(cfg.conv_layers))
    assert cfg.ffn_dim == [96] * 3
    cfg, new, _ = low_rank(cfg, new, budget=0.5, targets="attn")
    assert {f"layers.{i}.attn.{p}" for i in cfg.conv_layers for p in ("w_in", "wo")} <= set(cfg.low_rank)
    model = build_decoder(cfg, new)
    assert parameter_count(model) == cfg.num_parameters()
    assert torch.isfinite(forward_full(model, tokens())).all()


def test_uneven_head_choice_is_refused(src):
    with pytest.raises(CompressionError, match="different query-head counts"):
        keep_heads(src.config, src.state_dict, {0: [0, 1, 2]})


def test_dropping_an_identity_layer_is_exact(src, calib):
    sd = dict(src.state_dict)
    for name in ("attn.wo", "mlp.w_down"):  # block 1 adds nothing to the residual stream
        sd[f"layers.1.{name}.weight"] = torch.zeros_like(sd[f"layers.1.{name}.weight"])
    cfg, new, layer_map, report = structured_prune(src.config, sd, calib, drop=1)
    assert report["dropped_layers"] == [1] and layer_map == [0, 2] and cfg.n_layers == 2
    assert report["block_influence"][1] == pytest.approx(0.0, abs=1e-9)
    x = tokens()
    torch.testing.assert_close(logits(cfg, new, x), logits(src.config, sd, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_sparsity_hits_target(src, scope):
    model = build_decoder(src.config, src.state_dict)
    masks, report = magnitude_prune(model, 0.6, scope)
    assert report["achieved"] == pytest.approx(0.6, abs=0.01) and sparsity_of(model) == pytest.approx(0.6, abs=0.01)
    assert "do not run it faster" in report["note"]  # says plainly: no speed-up on dense runtimes
    if scope == "layer":
        for name, m in masks.items():
            assert 1 - m.float().mean() == pytest.approx(0.6, abs=0.01), name


def test_svd_full_rank_reproduces_and_low_rank_only_where_smaller(src):
    w = src.state_dict["layers.0.mlp.w_gate.weight"]  # [128, 64]
    a, b = factor(w, 64)
    torch.testing.assert_close(b @ a, w, atol=1e-5, rtol=1e-5)
    assert not is_smaller(64, 64, 128) and is_smaller(40, 64, 128)
    cfg, sd, report = low_rank(src.config, src.state_dict, energy=1.0)  # full rank: never smaller, never used
    assert cfg.low_rank is None and report["factored"] == 0 and sd.keys() == src.state_dict.keys()
    cfg, sd, report = low_rank(src.config, src.state_dict, budget=0.5, targets="mlp")
    assert report["factored"] == 9 and set(cfg.low_rank) == {f"layers.{i}.mlp.{p}" for i in range(3)
                                                             for p in ("w_gate", "w_up", "w_down")}
    model = build_decoder(cfg, sd)
    assert isinstance(model.layers[0].mlp.w_down, LowRankLinear) and model.layers[0].mlp.w_down.rank == 21
    assert parameter_count(model) == cfg.num_parameters() < src.config.num_parameters()
    # the config (with ranks) survives a manifest round trip and the weights load back strictly
    from edgelm.config import ModelConfig

    cfg2 = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert cfg2 == cfg and "low_rank" not in src.config.to_dict()
    sd2 = {k: v for k, v in model.state_dict().items() if k != "output.weight"}
    x = tokens()
    torch.testing.assert_close(logits(cfg2, sd2, x), logits(cfg, sd, x))


def test_gpt2_prunes_and_factors_exactly(calib):
    """GPT-2's ungated MLP (w_up, w_down) and biased MHA go through the same pruning and SVD."""
    src = load_tiny(n_layers=2, arch="gpt2", n_kv_heads=4, qkv_bias=True, o_bias=True, mlp_bias=True)
    sd = dict(src.state_dict)
    assert "layers.0.mlp.w_gate.weight" not in sd and sd["pos_embeddings.weight"].shape == (128, 64)
    for i in range(2):  # FFN channels 0-31 and heads 1, 3 write nothing
        down, wo = sd[f"layers.{i}.mlp.w_down.weight"].clone(), sd[f"layers.{i}.attn.wo.weight"].clone()
        down[:, :32] = 0
        wo[:, 16:32] = wo[:, 48:64] = 0
        sd[f"layers.{i}.mlp.w_down.weight"], sd[f"layers.{i}.attn.wo.weight"] = down, wo
    cfg, new, _, _ = structured_prune(src.config, sd, calib, ffn=0.25, heads=0.5, multiple_of=1)
    assert cfg.ffn_dim == [96, 96] and cfg.n_heads == cfg.n_kv_heads == [2, 2]
    assert new["layers.0.mlp.w_up.bias"].shape == (96,) and new["layers.0.attn.wk.bias"].shape == (32,)
    x = tokens()
    torch.testing.assert_close(logits(cfg, new, x), logits(src.config, sd, x), atol=1e-5, rtol=1e-5)
    assert parameter_count(build_decoder(cfg, new)) == cfg.num_parameters()
    cfg2, sd2, report = low_rank(cfg, new, budget=0.5, targets="mlp")
    assert set(cfg2.low_rank) == {f"layers.{i}.mlp.{p}" for i in range(2) for p in ("w_up", "w_down")}
    assert parameter_count(build_decoder(cfg2, sd2)) == cfg2.num_parameters() < cfg.num_parameters()


def test_gpt2_learned_positions_bound_checkpoints_and_distillation(tmp_path):
    """A GPT-2 has positions only as far as its table: a checkpoint opened with a longer context is
    capped there, and teacher sequences that need more are a clear error."""
    from edgelm.converters.compress.checkpoint import load_checkpoint, save_checkpoint
    from edgelm.converters.compress.options import CompressOptions
    from edgelm.converters.compress.recipe import compress_source

    src = load_tiny(arch="gpt2", n_kv_heads=4, qkv_bias=True, o_bias=True, mlp_bias=True, max_context=32)
    ckpt = save_checkpoint(src, tmp_path / "ckpt")
    assert load_checkpoint(ckpt, max_context=500).config.max_context == 32
    short = load_checkpoint(ckpt, max_context=16)
    assert build_decoder(short.config, short.state_dict).pos_embeddings.weight.shape == (16, 64)
    opts = CompressOptions(distill_steps=1, distill_sequences=1, distill_seq_len=64, evaluate=False)
    with pytest.raises(CompressionError, match="learned positions for 32 tokens"):
        compress_source(src, opts, progress=False)


def test_distillation_windows_fit_a_short_context():
    """Teacher text longer than the model's context (--distill-seq-len 128, --max-context 32) trains on
    windows of the context, not past the position table."""
    from edgelm.converters.compress.options import CompressOptions
    from edgelm.converters.compress.recipe import compress_source

    src = load_tiny(n_layers=2, max_context=32)
    opts = CompressOptions(prune_ffn=0.25, distill_steps=2, distill_sequences=2, distill_batch=2, distill_seq_len=128,
                           evaluate=False, multiple_of=1)
    out, report = compress_source(src, opts, progress=False)
    assert out.config.max_context == 32 and out.config.ffn_dim == [96, 96]
    assert report["distill_data"]["tokens"] == 2 * 128


def test_dropping_a_layer_renumbers_the_nope_layers():
    """SmolLM3's layers without RoPE keep their place when an earlier layer goes."""
    src = load_tiny(n_layers=4, nope_layers=[3])
    cfg, sd = drop_layers(src.config, src.state_dict, [0])
    assert cfg.nope_layers == [2] and not build_decoder(cfg, sd).layers[2].attn.rope
    cfg, sd = drop_layers(cfg, sd, [2])
    assert cfg.nope_layers is None


def test_dropping_layers_keeps_each_layers_rotary_base_and_window():
    """Gemma 3's sliding-window layers use their own rotary base and window: the survivors keep theirs."""
    src = load_tiny(n_layers=4, arch="gemma3", local_layers=[0, 2], local_rope_theta=1e4, rope_theta=1e6,
                    sliding_window=8)
    cfg, sd = drop_layers(src.config, src.state_dict, [1])
    assert (cfg.local_layers, cfg.local_rope_theta, cfg.sliding_window) == ([0, 1], 1e4, 8)
    cfg, sd = drop_layers(cfg, sd, [0, 1])
    assert (cfg.local_layers, cfg.local_rope_theta, cfg.sliding_window, cfg.n_layers) == (None, None, None, 1)
    model = build_decoder(cfg, sd)
    assert model.rope_cos_local is None and not model.layers[0].local_rope and model.layers[0].attn.window is None
    # Mistral: every layer slides (local_layers None), and still does after a drop
    src = load_tiny(n_layers=3, sliding_window=8)
    cfg, _ = drop_layers(src.config, src.state_dict, [1])
    assert (cfg.local_layers, cfg.sliding_window, cfg.window(1)) == (None, 8, 8)


def _pruned_pair(src, calib):
    teacher = build_decoder(src.config, src.state_dict)
    cfg, sd, layer_map, _ = structured_prune(src.config, src.state_dict, calib, heads=0.5, ffn=0.5, multiple_of=8)
    return teacher, build_decoder(cfg, sd), layer_map


def test_distillation_lowers_kl_and_keeps_sparsity(src, calib):
    teacher, student, layer_map = _pruned_pair(src, calib)
    masks, _ = magnitude_prune(student, 0.3)
    data = tokens(64, seed=5).repeat(4, 1)
    windows = tokens(32, seed=9).tolist()
    ref = teacher_targets(teacher, windows)
    before = evaluate(student, windows, ref)["kl"]
    cfg = DistillConfig(steps=40, batch_size=4, seq_len=32, lr=3e-3, eval_every=20, progress=False,
                        ce_weight=0.1, hidden_mse_weight=0.1)
    result = distill(teacher, student, data, cfg, eval_windows=windows, layer_map=layer_map, masks=masks)
    after = evaluate(student, windows, ref)["kl"]
    assert after < 0.8 * before, (before, after)
    assert [h["step"] for h in result.history] == [0, 20, 40]
    assert sparsity_of(student) == pytest.approx(0.3, abs=0.01)


def test_bf16_distillation_lowers_kl_and_keeps_fp32_weights(src, calib):
    teacher, student, _ = _pruned_pair(src, calib)
    data = tokens(64, seed=5).repeat(4, 1)
    windows = tokens(32, seed=9).tolist()
    ref = teacher_targets(teacher, windows)
    before = evaluate(student, windows, ref)["kl"]
    cfg = DistillConfig(steps=40, batch_size=4, seq_len=32, lr=3e-3, eval_every=40, progress=False, precision="bf16")
    distill(teacher, student, data, cfg)
    after = evaluate(student, windows, ref)["kl"]
    assert after < 0.8 * before, (before, after)
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    with pytest.raises(CompressionError, match="fp32 or bf16"):
        distill(teacher, student, data, DistillConfig(steps=1, batch_size=2, seq_len=16, precision="fp16"))


def test_interrupted_distillation_resumes_from_checkpoint(src, calib, tmp_path):
    data = tokens(48, seed=7).repeat(3, 1)
    cfg = DistillConfig(steps=6, batch_size=2, seq_len=24, lr=1e-3, checkpoint_every=2, eval_every=100,
                        progress=False)
    teacher, straight, _ = _pruned_pair(src, calib)
    distill(teacher, straight, data, cfg)

    _, student, _ = _pruned_pair(src, calib)

    def interrupt(step, _loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(teacher, student, data, cfg, checkpoint_dir=tmp_path, on_step=interrupt)
    assert torch.load(tmp_path / "distill-state.pt", weights_only=False)["step"] == 3
    _, fresh, _ = _pruned_pair(src, calib)  # a new process: weights come from the checkpoint
    result = distill(teacher, fresh, data, cfg, checkpoint_dir=tmp_path)
    assert result.resumed_from == 3 and len(result.losses) == 3
    for (name, a), b in zip(straight.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def edgelm(*args):
    proc = subprocess.run([sys.executable, "-m", "edgelm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_compress_then_convert_round_trip(tmp_path):
    ckpt = tmp_path / "ckpt"
    out = edgelm("compress", "builtin:tiny", "-o", ckpt, "--prune-ffn", "0.25", "--prune-heads", "0.5",
                 "--low-rank-budget", "0.6", "--low-rank-targets", "mlp", "--sparsity", "0.2",
                 "--distill-steps", "3", "--distill-seq-len", "24", "--distill-sequences", "4", "--distill-batch", "2",
                 "--eval-windows", "2").stdout
    assert "parameters" in out and "dense runtimes do not run it faster" in out
    meta = json.loads((ckpt / "edgelm-checkpoint.json").read_text())
    assert meta["config"]["ffn_dim"] == [96, 96] and meta["config"]["n_heads"] == [2, 2]
    assert meta["config"]["low_rank"]
    report = json.loads((ckpt / "compression.json").read_text())
    assert report["params_after"] < report["params_before"] and "distilled" in report["quality"]

    from edgelm.converters.sources import load_source

    src = load_source(str(ckpt))
    assert src.description["kind"] == "checkpoint" and src.config.low_rank == meta["config"]["low_rank"]
    bundle = tmp_path / "bundle"
    edgelm("convert", ckpt, "-f", "onnx", "-o", bundle, "--threads", "1")
    manifest = json.loads((bundle / "edgelm.json").read_text())
    assert manifest["model"]["ffn_dim"] == [96, 96] and manifest["model"]["low_rank"] == meta["config"]["low_rank"]
    assert manifest["verification"]["parity"]["passed"] is True
    from edgelm.bench import bench_bundle

    row = bench_bundle(str(bundle), new_tokens=3, runs=1, warmup=0, threads=1)
    ratio = manifest["source"]["compression"]["params_ratio"]
    assert ratio < 1 and row["name"] == f"edgelm onnx fp32 (compressed to {ratio:.0%} of the parameters)"
