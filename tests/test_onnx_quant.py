"""Quantized ONNX bundles (onnxruntime.quantization), on the tiny model: every scheme converts,
passes its gates, and the final graph really holds what the report says."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import convert_bundle

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

MAX_PREFILL = 8  # calibration windows (128 tokens) are then fed in chunks through the KV cache
SCHEMES = ("w8", "w8a8", "w4a8", "w8a8-static")
# Random tiny weights give flat logits, so int4 moves many argmaxes (ExecuTorch's w4a8 gets 0.58 here).
MIN_TOP1 = {"w4a8": 0.5}


def _convert(root, scheme, **kwargs):
    return convert_bundle(root / scheme, fmt="onnx", scheme=scheme, max_prefill=MAX_PREFILL, verify_steps=16,
                          eval_windows=1, calib_windows=2, min_top1=MIN_TOP1.get(scheme), **kwargs)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-quant")
    cache = {}

    def get(scheme):
        if scheme not in cache:
            cache[scheme] = _convert(root, scheme) if scheme != "fp32" else convert_bundle(
                root / "fp32", fmt="onnx", max_prefill=MAX_PREFILL, verify_steps=16)
        return cache[scheme]

    return get


def _graph(path):
    import onnx

    return onnx.load(str(path / "model.onnx"))


def _weight_bytes(model):
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def _attrs(node):
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_converts_passes_gates_and_quantizes_every_linear(bundles, scheme, tiny_model):
    from edgelm.bundle import load_manifest
    from edgelm.runtime import Engine

    path = bundles(scheme)
    _, manifest = load_manifest(path)
    assert manifest.format == "onnx" and manifest.scheme == scheme
    ver = manifest.verification
    assert ver["parity"]["passed"] and ver["quality"]["passed"]
    assert ver["quality"]["perplexity_increase"] < 0.1
    q = ver["lowering"]["quantization"]
    n_linear = 7 * tiny_model.cfg.n_layers + 1
    assert q["tool"] == "onnxruntime.quantization"
    assert q["linear_total"] == q["linear_quantized"] == n_linear and q["linear_left_fp32"] == []
    assert q["lm_head"] == "int8" and q["embedding"] == "int8"  # the defaults
    assert q["embedding_note"].startswith("tied")  # the tiny model ties them: one int8 table
    expected = {"w4a8": {"int4": n_linear - 1, "int8": 1}}.get(scheme, {"int8": n_linear})
    assert q["weights"] == expected
    fp32 = _graph(bundles("fp32"))
    model = _graph(path)
    assert _weight_bytes(model) < 0.4 * _weight_bytes(fp32)
    assert (path / "model.onnx").stat().st_size < (bundles("fp32") / "model.onnx").stat().st_size
    # and it generates
    engine = Engine.load(path, threads=1)
    assert len(list(engine.generate_ids(engine.tokenizer.encode("hello there"), max_new_tokens=6))) > 0


def test_ops_in_the_final_graph(bundles, tiny_model):
    """Each scheme is the op the module docstring promises, and non-linear MatMuls stay float."""
    from edgelm.bundle import load_manifest

    n_linear = 7 * tiny_model.cfg.n_layers + 1
    ops = {s: [n for n in _graph(bundles(s)).graph.node] for s in SCHEMES}

    nbits = [n for n in ops["w8a8"] if n.op_type == "MatMulNBits"]
    assert len(nbits) == n_linear
    assert all(_attrs(n)["bits"] == 8 and _attrs(n)["accuracy_level"] == 4 for n in nbits)

    nbits = [_attrs(n) for n in ops["w4a8"] if n.op_type == "MatMulNBits"]
    assert sorted(a["bits"] for a in nbits) == [4] * (n_linear - 1) + [8]
    assert all(a["accuracy_level"] == 4 for a in nbits)
    assert {a["block_size"] for a in nbits if a["bits"] == 4} == {32}  # QuantSpec.group_size

    dq = [n for n in ops["w8"] if n.op_type == "DequantizeLinear"]
    assert len(dq) == n_linear and not any(n.op_type == "QuantizeLinear" for n in ops["w8"])
    _, manifest = load_manifest(bundles("w8"))
    assert manifest.io["session_config"] == {"session.disable_quant_qdq": "1"}

    static = ops["w8a8-static"]
    produced_by = {o: n for n in static for o in n.output}
    linear_mm = [n for n in static if n.op_type == "MatMul" and produced_by.get(n.input[1], n).op_type
                 == "DequantizeLinear"]
    assert len(linear_mm) == n_linear
    assert all(produced_by[n.input[0]].op_type == "DequantizeLinear" for n in linear_mm)  # calibrated activations
    consumers = {i for n in static if n.op_type == "QuantizeLinear" for i in n.input}
    assert not any(n.output[0] in consumers for n in linear_mm)  # outputs stay float

    # RMSNorm's and RoPE's constant MatMuls and the attention MatMuls are not linears: float in every scheme
    fp32_mm = [n for n in _graph(bundles("fp32")).graph.node if n.op_type in ("MatMul", "Gemm")]
    fp32_const_mm = len(fp32_mm) - n_linear
    assert fp32_const_mm == 6 * tiny_model.cfg.n_layers + 1  # per layer 2 RMSNorm, 2 RoPE, 2 attention; final norm
    for scheme in ("w8a8", "w4a8"):
        float_mm = [n for n in ops[scheme] if n.op_type == "MatMul" and not n.name.endswith(("_offsets", "_sums"))]
        assert len(float_mm) == fp32_const_mm


def test_lm_head_and_embedding_choices(tmp_path):
    path = _convert(tmp_path, "w4a8", lm_head="fp32", embedding="fp32")
    from edgelm.bundle import load_manifest

    q = load_manifest(path)[1].verification["lowering"]["quantization"]
    assert q["linear_left_fp32"] == ["output"] and q["lm_head"] == "fp32" and q["embedding"] == "fp32"
    path = _convert(tmp_path / "b", "w4a8", lm_head="scheme")
    q = load_manifest(path)[1].verification["lowering"]["quantization"]
    assert q["lm_head"] == "int4" and q["weights"] == {"int4": q["linear_total"]}
    assert q["embedding"] == "int8" and q["embedding_note"].startswith("its own")  # the tied head is int4 now


def test_symmetric_int4_is_plain_matmulnbits(tmp_path):
    """--int4-symmetric: MatMulNBits' own zero point, no block sums or offsets."""
    from edgelm.bundle import load_manifest

    path = _convert(tmp_path, "w4a8", int4_symmetric=True)
    q = load_manifest(path)[1].verification["lowering"]["quantization"]
    assert q["zero_point"] == "symmetric" and q["weights"] == {"int4": q["linear_total"] - 1, "int8": 1}
    nodes = _graph(path).graph.node
    assert not any(n.name.endswith(("_offsets", "_sums")) for n in nodes)
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == q["linear_total"]
    from edgelm.bench import bench_bundle

    assert bench_bundle(str(path), new_tokens=2, runs=1, warmup=0, threads=1)["name"] == "edgelm onnx w4a8 symmetric"


def _run(path, ids):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([ids], dtype=np.int64), "position_ids": np.arange(len(ids))[None],
            "logits_to_keep": np.array([len(ids) - 1])}
    for i in sess.get_inputs()[3:]:
        feed[i.name] = np.zeros(i.shape, dtype=np.float32)
    return sess.run(["logits"], feed)[0]


@pytest.mark.parametrize("lm_head", ["int8", "fp32"])
def test_untied_model_embedding_and_tied_fp32_head(tmp_path, lm_head):
    from edgelm.converters.lowering import LowerOptions, get_lowering
    from edgelm.converters.model import build_decoder
    from edgelm.converters.quant import QuantSpec
    from edgelm.converters.sources import load_tiny

    ext, lower = get_lowering("onnx", "w8a8")
    src = load_tiny(tie_embeddings=False)
    model = build_decoder(src.config, src.state_dict)
    lowered = lower(model, tmp_path / f"q{ext}", LowerOptions(max_prefill=MAX_PREFILL,
                                                              quant=QuantSpec("w8a8", lm_head=lm_head)))
    lower(model, tmp_path / f"f{ext}", LowerOptions(max_prefill=MAX_PREFILL))
    q = lowered.report["quantization"]
    assert q["embedding"] == "int8" and q["lm_head"] == ("int8" if lm_head == "int8" else "fp32")
    ids = [5, 6, 7, 8]
    got, ref = _run(tmp_path / "q.onnx", ids), _run(tmp_path / "f.onnx", ids)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("bits", [4, 8])
def test_blocks_with_minimum_are_exact_on_a_4bit_grid(bits):
    """Weights already on a Q4_1-style grid (scale * q + minimum per block of 32, as in a model
    dequantized from GGUF) come back exactly (a 4-bit grid is also on the 8-bit one: 255 = 17 * 15);
    K need not be a multiple of the block."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgelm.converters.lowering.onnx_quant import LinearNode, blocks_with_minimum

    rng = np.random.default_rng(0)
    k, n, block = 80, 24, 32
    kb = -(-k // block)
    scale = rng.uniform(0.01, 0.1, size=(kb, n)).astype(np.float32)
    low = rng.uniform(-1, 0, size=(kb, n)).astype(np.float32)
    q = rng.integers(0, 16, size=(kb * block, n))
    q[0::block], q[1::block] = 0, 15  # every block uses its whole range, as a Q4_1 quantizer leaves it
    w = (np.repeat(scale, block, 0) * q + np.repeat(low, block, 0))[:k].astype(np.float32)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="lin")], "g", [x_info], [y_info],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = blocks_with_minimum(model, [LinearNode("lin", "lin", "w", k, n)], block, bits=bits)
    onnx.checker.check_model(model)
    nbits = next(node for node in model.graph.node if node.op_type == "MatMulNBits")
    assert _attrs(nbits)["bits"] == bits
    # stored levels and block scales reproduce w exactly
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    levels = inits[f"w_Q{bits}"]
    if bits == 4:
        levels = np.stack([levels & 15, levels >> 4], -1).reshape(n, kb, block)
    levels = levels.astype(np.float32)
    zp = 2 ** (bits - 1)
    deq = inits["w_scales"][..., None] * (levels - zp) + inits["w_offsets"].T[..., None]
    np.testing.assert_allclose(deq.reshape(n, -1).T[:k], w, atol=1e-5)
    x = rng.normal(size=(1, 3, k)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    # accuracy_level 4 quantizes x to int8 per block: compare against that, not against float x
    assert np.abs(y - x @ w).max() < 0.02 * np.abs(x @ w).max()


def test_shared_int8_embedding_reads_the_nbits_lm_head(tmp_path):
    """The tied table is read from the LM head's MatMulNBits weight, also when K is padded."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgelm.converters.lowering.onnx_quant import int8_embedding, nbits

    rng = np.random.default_rng(1)
    vocab, dim = 40, 48  # 48 = one and a half blocks of 32
    table = rng.normal(size=(vocab, dim)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"], name="embedding"),
             helper.make_node("MatMul", ["emb", "output.weight"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, 3, dim]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, vocab])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(table.T.copy(), "output.weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = nbits(model, ["head"], bits=8, block_size=32, accuracy_level=4, symmetric=True)
    how = int8_embedding(model, "embedding", "output.weight")
    assert how.startswith("tied")
    assert "table" not in {t.name for t in model.graph.initializer}  # stored once
    ids = np.array([[0, 7, vocab - 1]], dtype=np.int64)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    emb = sess.run(["emb"], {"input_ids": ids})[0]
    step = np.abs(table).max() / 127
    assert emb.shape == (1, 3, dim) and np.abs(emb - table[ids]).max() <= step


def test_calibration_reader_feeds_chunks_through_a_consistent_cache(bundles, tmp_path):
    """A window longer than max_prefill is fed in chunks; each chunk's cache holds the rows the
    fp32 graph computed for the chunks before it, so its logits equal the unchunked ones."""
    import onnxruntime as ort

    from edgelm.converters.lowering.onnx_quant import WindowReader

    fp32 = bundles("fp32") / "model.onnx"
    window = list(range(10, 30))  # 20 tokens: chunks of 8, 8, 4
    feeds = list(WindowReader(fp32, [window], chunk=MAX_PREFILL)._generate())
    assert [f["input_ids"].shape[1] for f in feeds] == [8, 8, 4]
    assert [int(f["position_ids"][0, 0]) for f in feeds] == [0, 8, 16]
    assert not feeds[0]["past_key_values.0.key"].any()
    assert not feeds[2]["past_key_values.0.key"][:, :, 16:].any() and feeds[2]["past_key_values.0.key"][:, :, :16].any()
    sess = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    last = sess.run(["logits"], feeds[2])[0]
    np.testing.assert_allclose(last, _run(fp32, window), atol=1e-4)


def test_calibrated_scheme_with_an_int8_cache(tmp_path):
    """w8a8-static calibrates through the graph's own cache inputs, which an int8 cache makes int8 codes and
    float32 scales: the reader feeds each input in its own type (a float32 feed was refused by the graph)."""
    import onnx

    out = _convert(tmp_path, "w8a8-static", kv_cache="int8")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert {v.name: v.type.tensor_type.elem_type for v in graph.input}["past_key_values.0.key"] == onnx.TensorProto.INT8
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # calibrated activations


def test_onnx_declares_every_scheme():
    from edgelm.converters.lowering import supported_schemes
    from edgelm.converters.quant import SCHEMES

    assert set(supported_schemes("onnx")) == set(SCHEMES)
