"""Target profiles: the built-in TOMLs, user profiles, ``extends``, validation and the memory check.

Pure Python and fast: no torch, no model files.
"""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from pathlib import Path

import pytest

from edgelm.config import ModelConfig
from edgelm.errors import EdgeLMError
from edgelm.targets import (
    FORMATS,
    SCHEMES,
    MemoryEstimate,
    Profile,
    TargetError,
    apply_profile,
    check_memory,
    estimate_memory,
    kv_cache_bytes,
    list_profiles,
    load_profile,
    profile_from_dict,
    profile_to_dict,
)
from tests.conftest import requires_smollm2

BUILTINS = ["android-arm64", "arm64-generic", "raspberry-pi-4", "raspberry-pi-5", "x86-64"]

SMOLLM2_135M = ModelConfig(arch="llama", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                           ffn_dim=1536, head_dim=64, tie_embeddings=True, max_context=2048)
LLAMA_7B = ModelConfig(arch="llama", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                       ffn_dim=11008, head_dim=128, max_context=4096)

MINIMAL = """
[device]
architecture = "aarch64"
cores = 4
features = ["neon"]
memory_mb = 1024

[convert]
formats = ["onnx"]
scheme = "w8a8"
threads = 2
max_context = 512
max_prefill = 128

[deploy]
transport = "ssh"
workdir = "~/edgelm"
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(ref) -> str:
    with pytest.raises(TargetError) as info:
        load_profile(ref)
    return str(info.value)


# --------------------------------------------------------------------------- built-ins


def test_list_profiles_lists_all_five():
    assert list_profiles() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_profile_loads_and_validates(name):
    p = load_profile(name)
    assert isinstance(p, Profile)
    assert p.name == name and p.description and p.extends is None
    assert p.format == p.convert.formats[0] and set(p.convert.formats) <= set(FORMATS)
    assert p.convert.scheme in SCHEMES
    assert 1 <= p.convert.threads <= p.device.cores
    if p.device.big_cores is not None:
        assert p.convert.threads <= p.device.big_cores  # big cores only
    assert p.convert.max_prefill <= p.convert.max_context
    assert p.convert.prefill_lengths == sorted(p.convert.prefill_lengths)
    for fmt in p.convert.formats:
        pkgs = p.packages(fmt)
        assert {"numpy", "tokenizers", "jinja2"} <= set(pkgs)
    assert "onnxruntime" in p.packages("onnx") and "ai-edge-litert" in p.packages("tflite")
    assert {"executorch", "torch"} <= set(p.packages("pte"))
    assert p.deploy.transport in ("local", "ssh", "adb")
    # the dict form is JSON-ready (it goes into the bundle manifest) and round-trips
    data = json.loads(json.dumps(profile_to_dict(p)))
    assert "path" not in data
    assert profile_from_dict(data) == p


def test_builtin_facts():
    pi4, pi5 = load_profile("raspberry-pi-4"), load_profile("raspberry-pi-5")
    assert "dotprod" not in pi4.device.features and "fp16" not in pi4.device.features
    assert {"dotprod", "fp16"} <= set(pi5.device.features)
    assert (pi4.device.soc, pi5.device.soc) == ("BCM2711", "BCM2712")
    android = load_profile("android-arm64")
    assert android.deploy.transport == "adb" and android.deploy.workdir == "/data/local/tmp/edgelm"
    assert android.convert.threads == android.device.big_cores < android.device.cores
    assert "avx2" in load_profile("x86-64").device.features


def test_unknown_name_lists_the_known_ones():
    msg = error_of("raspberry-pi-6")
    assert "unknown target 'raspberry-pi-6'" in msg
    for name in BUILTINS:
        assert name in msg
    assert isinstance(TargetError("x"), EdgeLMError)


def test_missing_file(tmp_path):
    msg = error_of(tmp_path / "nope.toml")
    assert "nope.toml" in msg and "raspberry-pi-4" in msg


# --------------------------------------------------------------------------- user profiles


def test_user_profile_from_a_path(tmp_path):
    path = write(tmp_path, "my-board.toml", MINIMAL)
    p = load_profile(path)
    assert p.name == "my-board" and p.path == str(path)
    assert p.convert.formats == ["onnx"] and p.convert.group_size == 32  # a default
    assert p.runtime.onnx == ["onnxruntime"] and p.deploy.python == "python3"  # defaults
    assert load_profile(str(path)) == p


def test_extends_overrides_only_some_keys(tmp_path):
    path = write(tmp_path, "pi5-8g.toml", """
        extends = "raspberry-pi-5"

        [device]
        memory_mb = 8192

        [convert]
        max_context = 4096
        prefill_lengths = [64, 256]
        """)
    base, p = load_profile("raspberry-pi-5"), load_profile(path)
    assert p.name == "pi5-8g" and p.extends == "raspberry-pi-5"
    assert p.device.memory_mb == 8192 and p.convert.max_context == 4096
    assert p.convert.prefill_lengths == [64, 256]  # arrays are replaced, not appended
    assert p.device.features == base.device.features and p.device.soc == "BCM2712"  # inherited
    assert p.convert.scheme == base.convert.scheme and p.deploy == base.deploy
    assert "raspberry-pi-5" in p.description


def test_extends_a_user_file_relative_to_it(tmp_path):
    write(tmp_path, "base.toml", MINIMAL)
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub", "child.toml", """
        extends = "../base.toml"
        name = "child-board"
        [convert]
        threads = 4
        """)
    p = load_profile(path)
    assert p.name == "child-board" and p.convert.threads == 4 and p.device.memory_mb == 1024


def test_extends_loop(tmp_path):
    write(tmp_path, "a.toml", 'extends = "b.toml"\n')
    write(tmp_path, "b.toml", 'extends = "a.toml"\n')
    msg = error_of(tmp_path / "a.toml")
    assert "extends" in msg and "loop" in msg


def test_unknown_extends(tmp_path):
    path = write(tmp_path, "bad.toml", 'extends = "raspberry-pi-9"\n')
    msg = error_of(path)
    assert msg.startswith(f"{path}: extends: unknown target 'raspberry-pi-9'")
    assert "raspberry-pi-5" in msg


# --------------------------------------------------------------------------- validation


def with_override(tmp_path, section: str, line: str, name: str = "bad.toml") -> Path:
    return write(tmp_path, name, f'extends = "raspberry-pi-4"\n[{section}]\n{line}\n')


@pytest.mark.parametrize("section, line, key, words", [
    ("convert", "thread = 2", "convert.thread", "unknown key; did you mean 'threads'"),
    ("device", "ram_mb = 2048", "device.ram_mb", "unknown key"),
    ("convert", 'threads = "4"', "convert.threads", "expected an integer, got string '4'"),
    ("convert", "threads = true", "convert.threads", "expected an integer, got boolean True"),
    ("convert", 'formats = "pte"', "convert.formats", "expected an array of strings"),
    ("convert", "prefill_lengths = [32, 64.5]", "convert.prefill_lengths", "expected an array of integers"),
    ("device", "memory_mb = 4096.5", "device.memory_mb", "expected an integer"),
    ("convert", "threads = 0", "convert.threads", "must be >= 1, got 0"),
    ("convert", "threads = 5", "convert.threads", "must be <= device.cores (4), got 5"),
    ("device", "memory_mb = 0", "device.memory_mb", "must be > 0, got 0"),
    ("device", "memory_mb = -512", "device.memory_mb", "must be > 0"),
    ("device", "usable_fraction = 1.5", "device.usable_fraction", "must be in (0, 1]"),
    ("device", 'architecture = "arm64"', "device.architecture", "must be one of aarch64, x86_64"),
    ("device", 'features = ["neon", "dotpord"]', "device.features", "did you mean 'dotprod'"),
    ("device", 'features = ["avx2"]', "device.features", "unknown aarch64 feature 'avx2'"),
    ("convert", 'formats = ["pte", "gguf"]', "convert.formats", "unknown format 'gguf'"),
    ("convert", "formats = []", "convert.formats", "must list at least one"),
    ("convert", 'scheme = "int4"', "convert.scheme", "unknown scheme 'int4'"),
    ("convert", "group_size = 48", "convert.group_size", "must be a power of two"),
    ("convert", "group_size = 8", "convert.group_size", "must be a power of two >= 16"),
    ("convert", "max_context = 8", "convert.max_context", "must be >= 16, got 8"),
    ("convert", "prefill_lengths = [128, 32]", "convert.prefill_lengths", "ascending"),
    ("convert", "prefill_lengths = [32, 32]", "convert.prefill_lengths", "ascending"),
    ("convert", "prefill_lengths = [32, 2048]", "convert.prefill_lengths", "must not exceed convert.max_context"),
    ("convert", "prefill_lengths = []", "convert.prefill_lengths", "tflite needs at least one"),
    ("convert", "max_prefill = 4096", "convert.max_prefill", "between 2 and convert.max_context (1024)"),
    ("runtime", "onnx = []", "runtime.onnx", "convert.formats lists onnx"),
    ("deploy", 'transport = "ftp"', "deploy.transport", "unknown transport 'ftp'"),
    ("convert", 'pte_attention = "fast"', "convert.pte_attention", "unknown value 'fast'; choose one of custom"),
])
def test_validation_error_names_file_and_key(tmp_path, section, line, key, words):
    path = with_override(tmp_path, section, line)
    msg = error_of(path)
    assert msg.startswith(f"{path}: {key}: "), msg
    assert words in msg, msg


def test_error_names_the_file_that_set_an_inherited_key(tmp_path):
    # max_context shrinks below the base's prefill lengths: the key came from the built-in file
    path = with_override(tmp_path, "convert", "max_context = 100\nmax_prefill = 64")
    msg = error_of(path)
    assert msg.startswith(f"{path}: convert.prefill_lengths: must not exceed convert.max_context (100)")
    assert "(set in raspberry-pi-4.toml; set convert.prefill_lengths in" in msg


def test_unknown_top_level_key_and_section_type(tmp_path):
    msg = error_of(write(tmp_path, "a.toml", 'extend = "raspberry-pi-4"\n'))
    assert ": extend: unknown key; did you mean 'extends'" in msg
    msg = error_of(write(tmp_path, "b.toml", 'extends = "raspberry-pi-4"\ndevice = 3\n'))
    assert ": device: expected a table [device]" in msg


def test_missing_required_key_and_section(tmp_path):
    msg = error_of(write(tmp_path, "a.toml", MINIMAL.replace("memory_mb = 1024\n", "")))
    assert "a.toml: device.memory_mb: missing (required)" in msg
    msg = error_of(write(tmp_path, "b.toml", MINIMAL.split("[deploy]")[0]))
    assert "b.toml: [deploy]: missing table" in msg


def test_invalid_toml(tmp_path):
    msg = error_of(write(tmp_path, "a.toml", "[device\n"))
    assert "a.toml: not valid TOML" in msg


def test_builtin_file_named_in_errors(monkeypatch):
    # the message for a broken built-in names its file, as in "raspberry-pi-4.toml: convert.threads: ..."
    import edgelm.targets as targets

    real = targets._read

    def broken(ref, base_dir, referrer):
        label, folder, raw = real(ref, base_dir, referrer)
        raw["convert"]["threads"] = 0
        return label, folder, raw

    monkeypatch.setattr(targets, "_read", broken)
    assert error_of("raspberry-pi-4") == "raspberry-pi-4.toml: convert.threads: must be >= 1, got 0"


# --------------------------------------------------------------------------- convert settings


def test_apply_profile_explicit_flags_override():
    p = load_profile("raspberry-pi-5")
    s = apply_profile(p)
    assert s == {"format": "pte", "scheme": "w8a8", "group_size": 32, "max_context": 2048, "max_prefill": 512,
                 "prefill_lengths": (32, 128, 512), "pte_attention": "custom"}
    s = apply_profile(p, format="onnx", scheme="w4a8", max_context=256)
    assert (s["format"], s["scheme"], s["max_context"]) == ("onnx", "w4a8", 256)
    assert s["max_prefill"] == 256 and s["prefill_lengths"] == (32, 128)  # profile values clamped
    assert apply_profile(p, max_prefill=64)["max_prefill"] == 64
    with pytest.raises(TargetError, match="unknown scheme"):
        apply_profile(p, scheme="w2")


def test_armv8_0_profiles_keep_pte_off_the_llama_kernels():
    """The llama:: kernels of ExecuTorch's aarch64 wheel need ARMv8.2-A (SIGILL on a Cortex-A72): every
    built-in aarch64 profile of an older core attends with plain ops, and a flag still overrides it."""
    for name in BUILTINS:
        p = load_profile(name)
        old_arm = p.device.architecture == "aarch64" and p.device.isa < "armv8.2-a"
        assert apply_profile(p)["pte_attention"] == ("portable" if old_arm else "custom"), name
    assert {n for n in BUILTINS if load_profile(n).device.isa == "armv8.0-a"} == {"raspberry-pi-4", "arm64-generic"}
    assert apply_profile(load_profile("raspberry-pi-4"), pte_attention="custom")["pte_attention"] == "custom"


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("name", BUILTINS)
def test_smollm2_135m_fits_every_profile(name):
    p = load_profile(name)
    est = check_memory(p, SMOLLM2_135M)
    assert isinstance(est, MemoryEstimate) and est.fits
    assert est.scheme == p.convert.scheme and est.max_context == p.convert.max_context
    assert est.total_bytes < est.budget_bytes
    assert est.kv_cache_bytes == 2 * 30 * 3 * 64 * p.convert.max_context * 4


def test_weights_by_scheme_are_ordered():
    p = load_profile("x86-64")
    sizes = {s: estimate_memory(p, SMOLLM2_135M, s).weights_bytes for s in SCHEMES}
    n = SMOLLM2_135M.num_parameters()
    assert sizes["fp32"] == 4 * n  # tied embedding stored once
    assert sizes["w8"] == sizes["w8a8"] == sizes["w8a8-static"]
    assert n < sizes["w8a8"] < 1.3 * n  # ~1 B/param plus scales and the 8-bit head copy
    assert sizes["w4a8"] < sizes["w8a8"] < sizes["fp32"]


def test_weights_match_published_parameter_counts():
    gpt2 = ModelConfig(arch="gpt2", vocab_size=50257, dim=768, n_layers=12, n_heads=12, n_kv_heads=12,
                       ffn_dim=3072, head_dim=64, tie_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True,
                       max_context=1024)
    n = gpt2.num_parameters()
    assert n == 124_439_808  # GPT-2 small's published count
    p = load_profile("x86-64")
    assert estimate_memory(p, gpt2, "fp32").weights_bytes == 4 * n
    # 1 B/param plus scales, and the 8-bit copy of the tied head (a third of GPT-2 small's parameters)
    assert n + 50257 * 768 < estimate_memory(p, gpt2, "w8a8").weights_bytes < 1.35 * n
    qwen3 = ModelConfig(arch="qwen3", vocab_size=151936, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                        ffn_dim=3072, head_dim=128, tie_embeddings=True, max_context=4096)
    assert qwen3.num_parameters() == 596_049_920  # Qwen3-0.6B, with its per-head q/k norms
    assert estimate_memory(p, qwen3, "fp32").weights_bytes == 4 * qwen3.num_parameters()
    gemma3 = ModelConfig(arch="gemma3", vocab_size=262144, dim=640, n_layers=18, n_heads=4, n_kv_heads=1,
                         ffn_dim=2048, head_dim=256, tie_embeddings=True, max_context=512,
                         local_layers=[i for i in range(18) if i % 6 != 5], local_rope_theta=1e4)
    assert gemma3.num_parameters() == 268_098_176  # Gemma 3 270M: sandwich norms, q/k norms
    assert estimate_memory(p, gemma3, "fp32").weights_bytes == 4 * gemma3.num_parameters()


def test_7b_does_not_fit_a_pi4_and_says_what_would():
    p = load_profile("raspberry-pi-4")
    with pytest.raises(TargetError) as info:
        check_memory(p, LLAMA_7B)
    msg = str(info.value)
    assert msg.startswith("the model does not fit raspberry-pi-4: 6738.4 M parameters at w8a8")
    assert "allows 3,072 MB (75% of 4096 MB)" in msg
    assert "no smaller scheme fits (w4a8 needs" in msg
    m = re.search(r"prune the model to about ([\d.]+) B parameters at w8a8 or about ([\d.]+) B parameters at w4a8",
                  msg)
    assert m, msg
    at_w8, at_w4 = float(m.group(1)), float(m.group(2))
    assert 1.0 < at_w8 < at_w4 < 4.0
    assert 'extends = "raspberry-pi-4"' in msg


def test_suggested_context_and_scheme_do_fit():
    p = load_profile("raspberry-pi-4")
    one_b = ModelConfig(arch="llama", vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                        ffn_dim=8192, head_dim=64, tie_embeddings=True)
    # fp32 at a long context: shorter contexts do not help (the weights are too big), w8a8 does
    with pytest.raises(TargetError) as info:
        check_memory(p, one_b, "fp32", 2048)
    msg = str(info.value)
    assert "no --max-context helps at fp32" in msg and "--scheme w8a8 (needs" in msg
    check_memory(p, one_b, "w8a8", 2048)
    # w8a8 at a huge context: the largest context that fits is suggested, and it fits
    with pytest.raises(TargetError) as info:
        check_memory(p, one_b, "w8a8", 65536)
    ctx = int(re.search(r"--max-context (\d+) \(the largest that fits at w8a8\)", str(info.value)).group(1))
    assert ctx % 16 == 0
    check_memory(p, one_b, "w8a8", ctx)
    with pytest.raises(TargetError):
        check_memory(p, one_b, "w8a8", ctx + 16)


def test_an_int8_kv_cache_is_counted_and_suggested_for_pte_and_onnx():
    p = load_profile("raspberry-pi-4")
    one_b = ModelConfig(arch="llama", vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                        ffn_dim=8192, head_dim=64, tie_embeddings=True)
    # an int8 row of a head: 64 codes, an fp32 scale and an int8 zero point (the .pte's own plan: test_cli)
    assert kv_cache_bytes(one_b, 1024, kv_cache="int8") == 2 * 16 * 8 * (64 + 5) * 1024
    with pytest.raises(TargetError) as info:  # the fp32 cache (1 GB) is what does not fit at 16k positions
        check_memory(p, one_b, "w8a8", 16384, "pte")
    msg = str(info.value)
    assert "fp32 KV cache 1,024 MB" in msg and "--kv-cache int8 (needs ~" in msg
    # the Pi 4's .pte attends in plain ops (pte_attention = "portable"), whose int8 rows are symmetric
    assert kv_cache_bytes(one_b, 1024, kv_cache="int8", pte_attention="portable") == 2 * 16 * 8 * (64 + 4) * 1024
    est = check_memory(p, one_b, "w8a8", 16384, "pte", kv_cache="int8")
    assert est.fits and est.kv_cache == "int8" and "int8 KV cache 272 MB" in est.summary()
    est = check_memory(p, one_b, "w8a8", 16384, "pte", kv_cache="int8", pte_attention="custom")
    assert est.fits and "int8 KV cache 276 MB" in est.summary()
    with pytest.raises(TargetError) as info:  # an .onnx holds one too, without zero points
        check_memory(p, one_b, "w8a8", 16384, "onnx")
    assert "--kv-cache int8 (needs ~" in str(info.value)
    assert kv_cache_bytes(one_b, 1024, kv_cache="int8", fmt="onnx") == 2 * 16 * 8 * (64 + 4) * 1024
    with pytest.raises(TargetError) as info:  # a .tflite cannot hold one
        check_memory(p, one_b, "w8a8", 16384, "tflite")
    assert "--kv-cache" not in str(info.value)
    lfm2 = dataclasses.replace(one_b, conv_layers=list(range(12)), conv_kernel=3, n_heads=[16] * 12 + [32] * 4,
                               n_kv_heads=[16] * 12 + [8] * 4)  # a convolution layer's cache stays fp32
    assert kv_cache_bytes(lfm2, 1024, kv_cache="int8") == 2 * (12 * 16 * 64 * 4 + 4 * 8 * (64 + 5)) * 1024
    with pytest.raises(TargetError, match="unknown KV cache type 'int4'"):
        kv_cache_bytes(one_b, 1024, kv_cache="int4")


def test_each_format_keeps_its_own_copies_of_the_weights():
    p = load_profile("x86-64")
    est = {(f, s): estimate_memory(p, SMOLLM2_135M, s, 2048, f, (32, 128)) for f in FORMATS for s in SCHEMES}
    for s in ("fp32", "w8a8", "w4a8"):  # what all three do; tflite packs once per signature, pte once
        assert est["tflite", s].copies_bytes > est["pte", s].copies_bytes > est["onnx", s].copies_bytes
    assert est["tflite", "fp32"].copies_bytes == 3 * est["tflite", "fp32"].weights_bytes  # decode + 2 prefills
    assert est["tflite", "w8"].total_bytes > est["tflite", "fp32"].total_bytes  # dequantized, then packed
    assert est["onnx", "w8"].copies_bytes == est["onnx", "fp32"].weights_bytes
    one_prefill = estimate_memory(p, SMOLLM2_135M, "fp32", 2048, "tflite", (128,))
    assert one_prefill.copies_bytes == 2 * one_prefill.weights_bytes
    assert est["pte", "fp32"].runtime_bytes > est["onnx", "fp32"].runtime_bytes  # torch comes with executorch


def test_format_schemes_match_the_lowerings():
    from edgelm.converters.lowering import supported_schemes
    from edgelm.targets import FORMAT_SCHEMES

    assert {f: tuple(supported_schemes(f)) for f in FORMATS} == FORMAT_SCHEMES


def test_a_format_that_fits_is_suggested():
    p = load_profile("raspberry-pi-4")  # 3 GB budget; formats onnx, tflite, pte
    m350 = ModelConfig(arch="llama", vocab_size=49152, dim=960, n_layers=32, n_heads=15, n_kv_heads=5,
                       ffn_dim=2560, head_dim=64, tie_embeddings=True)
    assert check_memory(p, m350, "fp32", 1024, "onnx").fits
    with pytest.raises(TargetError) as info:
        check_memory(p, m350, "fp32", 1024, "tflite")  # three packed fp32 copies
    msg = str(info.value)
    assert "as tflite" in msg and "--format onnx (needs ~" in msg and "--scheme w8a8 (needs ~" in msg
    with pytest.raises(TargetError) as info:  # pte would fit, but has no w8
        check_memory(p, m350, "w8", 1024, "tflite")
    assert "--format onnx (needs ~" in str(info.value) and "--format pte" not in str(info.value)


def test_check_memory_rejects_bad_arguments():
    p = load_profile("raspberry-pi-5")
    with pytest.raises(TargetError, match="unknown scheme"):
        check_memory(p, SMOLLM2_135M, "int3")
    with pytest.raises(TargetError, match="max_context must be >= 16"):
        check_memory(p, SMOLLM2_135M, max_context=8)
    with pytest.raises(TargetError, match="unknown format"):
        check_memory(p, SMOLLM2_135M, fmt="coreml")



@pytest.mark.integration
@requires_smollm2
@pytest.mark.parametrize("fmt", FORMATS)
def test_memory_estimate_matches_the_measured_peak(fmt, smollm2_bundles):
    """The estimate a target check makes, against the peak RSS of the real fp32 bundle loading,
    prefilling a chat prompt and generating in a fresh process (``scripts/memory_estimate.py``).
    Before the estimate told the formats apart it said ~0.8 GB for each; tflite peaks at ~2.4 GB."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "memory_estimate.py"
    out = subprocess.run([sys.executable, str(script), str(smollm2_bundles(fmt))], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    row = out.stdout.strip().splitlines()[-1].strip("| ").split(" | ")
    assert row[1:3] == [fmt, "fp32"], row
    measured, estimated = float(row[3]), float(row[4])
    assert measured > 600  # the child really loaded the 540 MB of weights
    assert 0.85 < estimated / measured < 1.2, (fmt, estimated, measured)


def test_memory_estimates_know_which_formats_hold_an_int8_cache():
    """targets (stdlib only) reads INT8_KV_FORMATS; the lowerings declare what they hold. They agree."""
    from edgelm.config import INT8_KV_FORMATS
    from edgelm.converters.lowering import _KV_CACHES, FORMATS, get_lowering

    for fmt in FORMATS:
        get_lowering(fmt)
        assert ("int8" in _KV_CACHES[fmt]) == (fmt in INT8_KV_FORMATS), fmt
