"""ONNX lowering and the onnxruntime backend, on the tiny model."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from edgelm.cli import main

from .conftest import convert_bundle

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

MAX_PREFILL = 8


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A verified .onnx bundle of the tiny model whose prefill takes at most 8 tokens per call."""
    return convert_bundle(tmp_path_factory.mktemp("tiny") / "tiny-onnx", fmt="onnx", max_prefill=MAX_PREFILL)


def test_conversion_passes_parity(tiny_onnx):
    from edgelm.bundle import load_manifest

    _, manifest = load_manifest(tiny_onnx)
    parity = manifest.verification["parity"]
    assert parity["passed"]
    assert parity["max_abs_err"] < 1e-3
    assert parity["top1_agreement"] == 1.0
    assert manifest.format == "onnx" and manifest.model_file == "model.onnx"


def test_io_names_and_manifest(tiny_onnx, tiny_model):
    import onnx

    cfg = tiny_model.cfg
    m = onnx.load(str(tiny_onnx / "model.onnx"), load_external_data=False)

    def shape(v):
        return [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]

    inputs = {v.name: shape(v) for v in m.graph.input}
    outputs = {v.name: shape(v) for v in m.graph.output}
    def kv(i, s):
        return [1, cfg.n_kv_heads[i], s, cfg.head_dim]

    assert list(inputs) == ["input_ids", "position_ids", "logits_to_keep"] + [
        f"past_key_values.{i}.{n}" for i in range(cfg.n_layers) for n in ("key", "value")]
    assert list(outputs) == ["logits"] + [f"present.{i}.{n}" for i in range(cfg.n_layers) for n in ("key", "value")]
    assert inputs["input_ids"] == inputs["position_ids"] == [1, "sequence_length"]
    assert inputs["logits_to_keep"] == ["num_logits"]
    assert inputs["past_key_values.0.key"] == kv(0, cfg.max_context)
    assert outputs["present.1.value"] == kv(1, "sequence_length")
    assert outputs["logits"] == [1, "num_logits", cfg.vocab_size]
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64

    from edgelm.bundle import load_manifest

    _, manifest = load_manifest(tiny_onnx)
    io = manifest.io
    assert io["max_prefill"] == io["max_verify"] == MAX_PREFILL and io["min_prefill"] == 1
    assert io["kv_cache"]["present_contains"] == "new_rows"
    assert io["kv_cache"]["layout"] == ["batch", "kv_heads", "max_context", "head_dim"]
    assert io["opset"] == m.opset_import[0].version
    assert io["data_file"] is None
    assert {p.key: p.value for p in m.metadata_props}["edgelm.present"] == "new_rows"


def test_greedy_generation_matches_pytorch(tiny_onnx, tiny_model):
    from edgelm.converters.verify import reference_run
    from edgelm.runtime.engine import Engine

    engine = Engine.load(tiny_onnx, threads=1)
    engine.eos_ids = frozenset()  # random weights: compare a fixed number of tokens
    assert engine.backend.max_prefill == MAX_PREFILL
    steps = 30
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    assert len(prompt) > 2 * MAX_PREFILL  # several prefill chunks, the last one partial
    expected, _ = reference_run(copy.deepcopy(tiny_model), prompt, steps)
    got = list(engine.generate_ids(prompt, max_new_tokens=steps))
    assert got == expected
    # a second generation reuses the same cache buffers (stale rows past the prompt are masked)
    assert list(engine.generate_ids(prompt[:5], max_new_tokens=steps)) == reference_run(
        copy.deepcopy(tiny_model), prompt[:5], steps)[0]


def test_decode_logits_match_reference(tiny_onnx, tiny_model):
    from edgelm.converters.verify import artifact_run, compare, reference_run
    from edgelm.runtime.engine import Engine

    engine = Engine.load(tiny_onnx, threads=1)
    prompt = list(range(3, 3 + 2 * MAX_PREFILL + 3))
    tokens, ref = reference_run(copy.deepcopy(tiny_model), prompt, 24)
    got = artifact_run(engine, prompt, tokens)
    result = compare(ref, got)
    assert result["max_abs_err"] < 1e-4 and result["top1_agreement"] == 1.0


def test_garbage_model_file_is_a_bundle_error(tiny_onnx, tmp_path):
    from edgelm.errors import BundleError
    from edgelm.runtime.engine import Engine

    broken = tmp_path / "broken"
    shutil.copytree(tiny_onnx, broken)
    (broken / "model.onnx").write_bytes(b"this is not an onnx model\x00\x01" * 100)
    with pytest.raises(BundleError, match="model.onnx"):
        Engine.load(broken, verify=False)
    with pytest.raises(BundleError, match="model.onnx"):  # the checksum catches it first
        Engine.load(broken)


def test_wrong_onnx_graph_is_a_bundle_error(tiny_onnx, tmp_path):
    """A valid ONNX file that is not an edgelm decoder graph."""
    import onnx
    from onnx import TensorProto, helper

    from edgelm.errors import BundleError
    from edgelm.runtime.engine import Engine

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other", [x], [y])
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_onnx, wrong)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(wrong / "model.onnx"))
    with pytest.raises(BundleError, match="past_key_values"):
        Engine.load(wrong, verify=False)


def test_running_an_onnx_bundle_does_not_import_torch(tiny_onnx):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from edgelm.runtime.engine import Engine\n"
        f"Engine.load({str(tiny_onnx)!r}, threads=1).complete('hello', max_new_tokens=4)\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxscript', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_sessions_stop_spinning_when_a_run_returns(tiny_onnx):
    """Idle threads that keep spinning slow down whatever runs next on the cores, e.g. the other
    session of a speculative pair (README: ONNX targets); the app's own sessions are left alone."""
    import onnxruntime as ort

    from edgelm.runtime.engine import Engine

    options = Engine.load(tiny_onnx, threads=1).backend.session.get_session_options()
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    mine = ort.InferenceSession(str(tiny_onnx / "model.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="does not have configuration"):
        mine.get_session_options().get_session_config_entry("session.force_spinning_stop")


def test_missing_onnxruntime_says_what_to_install(tiny_onnx, monkeypatch):
    import sys

    from edgelm.errors import BackendUnavailableError
    from edgelm.runtime.engine import Engine

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(BackendUnavailableError, match=r"pip install 'edgelm\[onnx\]'"):
        Engine.load(tiny_onnx, verify=False)


def test_external_data_path(tiny_model, tmp_path, tiny_onnx):
    """Weights over 2 GB go to model.onnx.data; forced here on the tiny model."""
    import onnxruntime as ort

    from edgelm.converters.lowering import LowerOptions, get_lowering

    ext, lower = get_lowering("onnx")
    out = tmp_path / f"model{ext}"
    lowered = lower(tiny_model, out, LowerOptions(max_prefill=MAX_PREFILL, extra={"external_data": True}))
    data = tmp_path / "model.onnx.data"
    assert lowered.io["data_file"] == data.name and data.is_file()
    assert out.stat().st_size < data.stat().st_size

    def logits(path):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {"input_ids": np.array([[5, 6, 7]], dtype=np.int64), "position_ids": np.array([[0, 1, 2]]),
                "logits_to_keep": np.array([0, 2])}
        for i in sess.get_inputs()[3:]:
            feed[i.name] = np.zeros(i.shape, dtype=np.float32)
        return sess.run(["logits"], feed)[0]

    np.testing.assert_allclose(logits(out), logits(tiny_onnx / "model.onnx"), atol=1e-5)


def test_prefix_reuse(tiny_onnx):
    """The next prompt runs only the tokens the cache does not hold, with a fresh engine's output."""
    from .test_chat import check_prefix_reuse

    check_prefix_reuse(tiny_onnx)


def test_int8_kv_cache(tiny_onnx, tiny_model, tmp_path):
    """--kv-cache int8 for ONNX: each attention layer's K and V are int8 codes with a float32 scale per row
    (symmetric), held by the backend (3.2x less cache memory than fp32 here, as edgelm estimates). The graph
    computes what the canonical Decoder computes with a functional int8 cache, through chunked prefill and
    decoding; a token's logits do not depend on how the prompt was chunked (the new rows are attended
    quantized, like the cached ones); the conversion is judged like a quantized one."""
    import onnx
    import torch

    from edgelm.bundle import load_manifest
    from edgelm.converters.lowering.onnx import functional_copy
    from edgelm.runtime.engine import Engine
    from edgelm.targets import kv_cache_bytes

    out = convert_bundle(tmp_path / "kv8", fmt="onnx", max_prefill=MAX_PREFILL, kv_cache="int8", eval_windows=2)
    cfg = tiny_model.cfg
    _, m = load_manifest(out)
    assert m.io["kv_cache_dtype"] == "int8" and m.io["kv_cache"]["dtype"] == "int8"
    assert "kv cache    int8 (symmetric rows), " in CliRunner().invoke(main, ["inspect", str(out)]).output
    parity, quality = m.verification["parity"], m.verification["quality"]
    assert parity["passed"] and quality["passed"] and quality["top1_agreement"] >= 0.9
    assert parity["max_abs_err"] > 1e-3  # the int8 cache is in use (the fp32 graph is within 1e-4)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    types = {v.name: (v.type.tensor_type.elem_type, [d.dim_value for d in v.type.tensor_type.shape.dim])
             for v in graph.graph.input}
    t, kv, d = cfg.max_context, cfg.n_kv_heads[0], cfg.head_dim
    i8, f32 = onnx.TensorProto.INT8, onnx.TensorProto.FLOAT
    assert types["past_key_values.0.key"] == types["past_key_values.1.value"] == (i8, [1, kv, t, d])
    assert types["past_key_values.0.key_scale"] == types["past_key_values.1.value_scale"] == (f32, [1, kv, t, 1])
    assert len(types) == 3 + 4 * cfg.n_layers

    engine = Engine.load(out, threads=1)
    backend = engine.backend
    int8 = kv_cache_bytes(cfg, t, kv_cache="int8", fmt="onnx")
    assert sum(c.nbytes for c in backend.caches) == int8
    fp32_cache = sum(c.nbytes for c in Engine.load(tiny_onnx, threads=1).backend.caches)
    assert fp32_cache == kv_cache_bytes(cfg, t) == 3.2 * int8  # head_dim 16: 64 B a row against 16 + 4

    ref = functional_copy(tiny_model, "int8")  # the canonical Decoder with a functional int8 cache
    ref.full_logits = True
    prompt = list(range(3, 3 + 2 * MAX_PREFILL + 3))
    steps = [prompt[i:i + MAX_PREFILL] for i in range(0, len(prompt), MAX_PREFILL)] + [[7], [11], [5]]
    caches, pos = [list(c) for c in ref.empty_caches()], 0
    for chunk in steps:
        with torch.no_grad():
            want, rows = ref(torch.tensor([chunk]), torch.tensor([pos]), caches)
        for cache, new in zip(caches, rows):
            for c, r in zip(cache, new):
                c[:, :, pos:pos + len(chunk)] = r
        got = backend.prefill(np.asarray(chunk), pos) if len(chunk) > 1 else backend.decode(chunk[0], pos)
        np.testing.assert_allclose(got, want[0, -1].numpy(), atol=1e-4)
        pos += len(chunk)
    for name, held, want in zip(("key", "key_scale", "value", "value_scale"), backend.caches[:4], caches[0],
                                strict=True):  # layer 0 holds the rows the reference holds
        held, want = held[:, :, :pos].astype(np.float32), want[:, :, :pos].numpy().astype(np.float32)
        if name.endswith("_scale"):
            np.testing.assert_allclose(held, want, rtol=1e-5)
        else:  # codes: equal, but for one step at a rare rounding tie
            assert np.abs(held - want).max() <= 1 and np.mean(held != want) < 0.01, name
    one_go = backend.prefill(np.asarray(prompt[:MAX_PREFILL]), 0)
    for p in range(MAX_PREFILL):  # the same tokens one by one
        by_one = backend.decode(prompt[p], p)
    np.testing.assert_allclose(one_go, by_one, atol=1e-4)
    assert list(engine.generate_ids(prompt, max_new_tokens=8))
