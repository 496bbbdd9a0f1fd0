"""Quantized ONNX artifacts: the fp32 graph from :mod:`.onnx`, quantized with ``onnxruntime.quantization``.

The fp32 export is saved first; quantization reads that file and the lowering writes the
final ``model.onnx``. Only the linear layers are targets (found from the exporter's node
metadata); the graph's other constant MatMuls (RMSNorm's ``inv_dim``, RoPE's rotation) and
the attention MatMuls stay float.

=============  ====================================================  =====================================
scheme         file                                                  what ONNX Runtime's CPU EP runs
=============  ====================================================  =====================================
w8a8           ``MatMulNBits(bits=8, accuracy_level=4)`` from        the same op: activations quantized to
               ``MatMulNBitsQuantizer``: int8 weights in blocks      int8 per block of 32 along K at run
               of :data:`W8_BLOCK` along K                           time
w8             ``DequantizeLinear(int8 [K, N], per channel)`` ->     ``MatMul`` on weights dequantized once
               ``MatMul`` (standard QDQ, weight only)                at load: the manifest asks for
                                                                     ``session.disable_quant_qdq`` so
                                                                     activations stay float
w4a8           ``MatMulNBits(bits=4, accuracy_level=4)``, int4       the same op, plus a small float
               blocks of ``group_size`` with a float minimum per     MatMul on block sums per input (see
               block (see :func:`blocks_with_minimum`)                       :func:`blocks_with_minimum`)
w8a8-static    ``quantize_static`` (QDQ): int8 per-channel           ``MatMulIntegerToFloat`` (fused from
               weights, uint8 activations calibrated (MinMax) on     the QDQ pairs)
               ``LowerOptions.calibration``; outputs stay float
=============  ====================================================  =====================================

Why not ``quantize_dynamic`` for w8a8 (``MatMulInteger``, fused to ``DynamicQuantizeMatMul``):
measured on SmolLM2-135M it was no faster and its one scale per token for the activations
cost 6x the KL of MatMulNBits' per-block scales (held-out top-1 0.915, perplexity +3.3%,
like ExecuTorch's w8a8; MatMulNBits: 0.947, +0.35%).

The LM head follows ``QuantSpec.lm_head`` (``int8``: the w8a8 op, int8 weights; ``scheme``:
like the other linears; ``fp32``: left alone). The embedding follows ``QuantSpec.embedding``:
``int8`` gathers int8 rows and dequantizes them (``Gather`` -> ``Cast`` -> ``Mul``, standard
ops). When the embedding is tied to an int8 LM head, the gather reads the LM head's int8
weight, so the table is stored once, as in the fp32 file.

What was really quantized is counted from the final graph (:func:`count_quantized`), not
from what was asked for.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgelm.converters.quant import QuantSpec
from edgelm.errors import ConversionError

log = logging.getLogger(__name__)

TOOL = "onnxruntime.quantization"
_LINEAR = "torch.nn.modules.linear.Linear"
_EMBEDDING = "torch.nn.modules.sparse.Embedding"
HEAD = "output"
_FLOAT = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
_INT = {TensorProto.INT8: 8, TensorProto.UINT8: 8, TensorProto.INT4: 4, TensorProto.UINT4: 4}
W8_BLOCK = 32  # w8a8 and the int8 LM head: block 64 measured KL 0.008 vs 0.005 on SmolLM2, 5% smaller
# w8: keep activations float. Without it the CPU EP fuses DequantizeLinear+MatMul into
# MatMulNBits(bits=8, accuracy_level=4), which quantizes activations (what w8a8 is for).
W8_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}
SHARED = "tied: a Gather reads the int8 lm_head's weight (stored once)"
OWN = "its own int8 table, one scale per row"


@dataclass
class LinearNode:
    """A MatMul/Gemm that computes one ``nn.Linear`` of the canonical Decoder."""

    node: str  # node name in the graph
    module: str  # module path in the Decoder, e.g. "layers.0.attn.wq" or "output"
    weight: str  # its weight initializer, renamed "<module>.weight" ([in_features, out_features])
    k: int  # in_features
    n: int  # out_features


@dataclass
class Prepared:
    model: onnx.ModelProto
    linears: list[LinearNode]
    embedding: str | None  # the embedding Gather's node name
    table: str | None  # its table initializer
    tied: bool  # the table is the LM head's weight (transposed)


def _meta(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _module_path(node: onnx.NodeProto, cls: str) -> str | None:
    """The Decoder module a node was exported from, from the exporter's node metadata."""
    meta = _meta(node)
    if cls not in meta.get("pkg.torch.onnx.class_hierarchy", ""):
        return None
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        return None
    # ['', 'decoder', 'decoder.layers.0', 'decoder.layers.0.attn', 'decoder.layers.0.attn.wq', 'linear']
    if len(scopes) < 2:
        return None
    path = scopes[-2]
    return path[len("decoder."):] if path.startswith("decoder.") else path


def prepare(model: onnx.ModelProto, untie_head: bool = True) -> Prepared:
    """Find the linear layers and the embedding; give every linear its own weight initializer
    named after its module. A tied LM head, ``MatMul(x, Transpose(table))``, gets a transposed
    copy for the quantizer to replace when ``untie_head``; otherwise it keeps reading the table."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    users: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    linears, embedding, table = [], None, None
    for node in list(graph.node):
        if node.op_type == "Gather" and node.input[0] in inits and _module_path(node, _EMBEDDING) is not None:
            embedding, table = node.name, node.input[0]
            continue
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        module = _module_path(node, _LINEAR)
        if module is None:
            continue
        b = node.input[1]
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or attrs.get("transB", 0):
                log.info("leaving %s (%s): a Gemm with transposed inputs", module, node.name)
                continue
        transposed = None
        if b not in inits and b in producers and producers[b].op_type == "Transpose" \
                and producers[b].input[0] in inits:
            transposed = producers[b]
        source = inits.get(b) if transposed is None else inits[transposed.input[0]]
        if source is None or source.data_type not in _FLOAT or len(source.dims) != 2:
            log.info("leaving %s (%s): its weight is not a 2-D float constant", module, node.name)
            continue
        if transposed is not None and not untie_head:
            linears.append(LinearNode(node.name, module, source.name, *(int(d) for d in source.dims[::-1])))
            continue
        name = f"{module}.weight"
        if transposed is None and users.get(b, 0) == 1:
            source.name = name
            weight = source
        else:  # a tied LM head, MatMul(x, Transpose(table)), or a shared weight: this linear's own copy
            w = numpy_helper.to_array(source)
            weight = numpy_helper.from_array(w.T.copy() if transposed is not None else w, name)
            graph.initializer.append(weight)
            if transposed is not None and users.get(b, 0) == 1:
                graph.node.remove(transposed)
        node.input[1] = name
        k, n = (int(d) for d in weight.dims)
        linears.append(LinearNode(node.name, module, name, k, n))
    tied = False
    if table is not None:
        head = next((lin for lin in linears if lin.module == HEAD), None)
        if head is not None and head.weight == table:
            tied = True
        elif head is not None:
            tbl = numpy_helper.to_array(inits[table])
            hw = numpy_helper.to_array(next(t for t in graph.initializer if t.name == head.weight))
            tied = tbl.shape == hw.T.shape and np.array_equal(tbl, hw.T)
    return Prepared(model, linears, embedding, table, tied)


# -- tools ---------------------------------------------------------------------------------------


def _quiet_tool_logs() -> None:
    """onnxruntime.quantization logs every node at INFO and warns about pre-processing."""
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    """Save ``model``, with its weights in ``path.data`` when protobuf cannot hold them."""
    onnx.save_model(model, str(path), save_as_external_data=not _bytes_fit(model), all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return path


def _bytes_fit(model: onnx.ModelProto) -> bool:
    return sum(t.ByteSize() for t in model.graph.initializer) < 1_900_000_000


@contextlib.contextmanager
def _tool_logging() -> Iterator[None]:
    """``quantize_static`` (like ``quantize_dynamic``) calls ``logging.warning`` on the root logger (advice
    to run pre-processing, which these graphs do not need); on a root logger without handlers that
    would also install a stderr handler for the whole process. Keep both from happening."""
    root = logging.getLogger()
    guard = logging.NullHandler() if not root.handlers else None
    quiet = logging.Filter("edgelm")  # passes only records of loggers named edgelm*; root's are dropped
    if guard:
        root.addHandler(guard)
    if not log.isEnabledFor(logging.DEBUG):
        root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        if guard:
            root.removeHandler(guard)


def _run_tool(model: onnx.ModelProto, work: Path, tag: str, fn) -> onnx.ModelProto:
    """Run an ``onnxruntime.quantization`` entry point that reads and writes files."""
    src, dst = work / f"{tag}-in.onnx", work / f"{tag}-out.onnx"
    _save(model, src)
    with _tool_logging():
        fn(src, dst, not _bytes_fit(model))
    return onnx.load(str(dst))


def nbits(model: onnx.ModelProto, nodes: list[str], bits: int, block_size: int, accuracy_level: int,
          symmetric: bool) -> onnx.ModelProto:
    """``MatMulNBitsQuantizer``: block-wise weights along K, one ``MatMulNBits`` per linear."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    wanted = set(nodes)
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in wanted]
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                             accuracy_level=accuracy_level, nodes_to_exclude=exclude,
                             quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",))
    q.process()
    return q.model.model


def blocks_with_minimum(model: onnx.ModelProto, linears: list[LinearNode], block_size: int, bits: int = 4,
                        accuracy_level: int = 4) -> onnx.ModelProto:
    """Block-wise int4/int8 weights with a *float* minimum per block, run by ``MatMulNBits``.

    Each block of ``block_size`` weights along K is stored as ``w = scale * q + minimum``,
    q in 0..2^bits-1 (GGUF's Q4_1 form for 4 bits). ``MatMulNBits`` (no zero-point input, so
    its fixed zero point 2^(bits-1) and its fast kernels) computes ``x @ (scale * (q - zp))``;
    the rest, ``(minimum + zp * scale)`` per block, is added by a small float MatMul on the
    block sums of ``x`` (``x @ indicator[K, K/block]``, computed once per input and shared by
    q/k/v).

    Why not ``MatMulNBitsQuantizer``'s own rounding: its zero points are integers, so a block's
    minimum is rounded to the int4 grid; on weights that already lie on a 4-bit grid with a
    float minimum (the embedded SmolLM2 is dequantized from a Q4_1 GGUF) every block gets a
    systematic offset of up to half a step, and held-out perplexity rose 40% (the quantizer's
    HQQ mode has float zero points and fixes that, but the CPU EP has no fast kernel for them:
    ~10x slower than fp32).
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    sums: dict[tuple[str, int], str] = {}
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    for lin in linears:
        node = nodes[lin.node]
        if node.op_type != "MatMul":
            continue
        w = numpy_helper.to_array(inits[lin.weight]).astype(np.float32)
        k, n = w.shape
        kb = -(-k // block_size)
        padded = np.pad(w, ((0, kb * block_size - k), (0, 0)), mode="edge")  # padding leaves min/max alone
        blocks = padded.T.reshape(n, kb, block_size)
        low, high = blocks.min(-1), blocks.max(-1)
        top, zp = 2 ** bits - 1, 2 ** (bits - 1)
        scale = ((high - low) / top).astype(np.float32)
        scale[scale == 0] = 1.0
        q = np.clip(np.rint((blocks - low[..., None]) / scale[..., None]), 0, top).astype(np.uint8)
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else q
        offsets = (low + zp * scale).T.astype(np.float32)  # [K/block, N]
        graph.initializer.remove(inits[lin.weight])
        graph.initializer.extend([numpy_helper.from_array(packed, lin.weight + f"_Q{bits}"),
                                  numpy_helper.from_array(scale, lin.weight + "_scales"),
                                  numpy_helper.from_array(offsets, lin.weight + "_offsets")])
        x, y = node.input[0], node.output[0]
        out = new_nodes.setdefault(lin.node, [])
        if (x, k) not in sums:
            indicator = f"block_indicator_{k}x{block_size}"
            if indicator not in inits:
                ind = np.zeros((k, kb), dtype=np.float32)
                ind[np.arange(k), np.arange(k) // block_size] = 1.0
                graph.initializer.append(numpy_helper.from_array(ind, indicator))
                inits[indicator] = graph.initializer[-1]
            sums[(x, k)] = f"{lin.node}_block_sums"
            out.append(helper.make_node("MatMul", [x, indicator], [sums[(x, k)]], name=f"{lin.node}_block_sums"))
        attrs = {"K": k, "N": n, "bits": bits, "block_size": block_size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        out += [
            helper.make_node("MatMulNBits", [x, lin.weight + f"_Q{bits}", lin.weight + "_scales"], [f"{y}_int"],
                             name=f"{lin.node}_Q{bits}", domain="com.microsoft", **attrs),
            helper.make_node("MatMul", [sums[(x, k)], lin.weight + "_offsets"], [f"{y}_offsets"],
                             name=f"{lin.node}_offsets"),
            helper.make_node("Add", [f"{y}_int", f"{y}_offsets"], [y], name=f"{lin.node}_add_offsets"),
        ]
    rebuilt = []
    for node in graph.node:
        rebuilt += new_nodes.get(node.name, [node])
    del graph.node[:]
    graph.node.extend(rebuilt)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def weight_only_int8(model: onnx.ModelProto, linears: list[LinearNode]) -> onnx.ModelProto:
    """Weight-only int8 as standard QDQ: ``DequantizeLinear(int8 [K, N], scale [N], axis=1) -> MatMul``.

    Per output channel, symmetric, range [-127, 127] (what ``onnxruntime.quantization`` uses for
    QInt8 weights). ONNX Runtime's CPU EP fuses each pair into ``MatMulNBits(bits=8)`` at load.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    where = {n.name: i for i, n in enumerate(graph.node)}
    inserts = []
    for lin in linears:
        w = numpy_helper.to_array(inits[lin.weight]).astype(np.float32)
        q, scale = quantize_per_channel(w, axis=0)
        graph.initializer.remove(inits[lin.weight])
        graph.initializer.extend([numpy_helper.from_array(q, lin.weight + "_quantized"),
                                  numpy_helper.from_array(scale, lin.weight + "_scale")])
        inserts.append((where[lin.node], helper.make_node(
            "DequantizeLinear", [lin.weight + "_quantized", lin.weight + "_scale"], [lin.weight],
            name=lin.node + "_DequantizeLinear", axis=1)))
    for i, node in sorted(inserts, key=lambda x: -x[0]):
        graph.node.insert(i, node)
    return model


def quantize_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per slice along the axes other than ``axis`` (reduced over ``axis``)."""
    amax = np.abs(w).max(axis=axis)
    scale = (amax / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / np.expand_dims(scale, axis)), -127, 127).astype(np.int8)
    return q, scale


class WindowReader:
    """``CalibrationDataReader`` over token windows, fed through the graph's own inputs.

    A window longer than ``chunk`` (the graph's ``max_prefill``) is fed in chunks; the KV
    cache each chunk sees is the one the fp32 graph built from the chunks before it, written
    the way the runtime writes it (``present`` rows at ``[start_pos:start_pos + S]``).
    """

    def __init__(self, fp32_path: Path, windows: list[list[int]], chunk: int) -> None:
        self.fp32_path, self.windows, self.chunk = fp32_path, windows, max(1, chunk)
        self.session = None
        self._feeds = self._generate()

    def _fp32(self):
        if self.session is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 3
            self.session = ort.InferenceSession(str(self.fp32_path), so, providers=["CPUExecutionProvider"])
        return self.session

    def _generate(self) -> Iterator[dict[str, np.ndarray]]:
        meta = onnx.load(str(self.fp32_path), load_external_data=False).graph.input
        past = [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim],
                 onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))  # an int8 cache: codes, scales
                for v in meta if v.name.startswith("past_key_values.")]
        keep = any(v.name == "logits_to_keep" for v in meta)  # absent from graphs written before it
        for window in self.windows:
            caches = {name: np.zeros(shape, dtype=dtype) for name, shape, dtype in past}
            for start in range(0, len(window), self.chunk):
                ids = np.asarray([window[start:start + self.chunk]], dtype=np.int64)
                s = ids.shape[1]
                feed = {"input_ids": ids, "position_ids": np.arange(start, start + s, dtype=np.int64)[None], **caches}
                if keep:
                    feed["logits_to_keep"] = np.asarray([s - 1], dtype=np.int64)
                yield feed
                if start + s < len(window):
                    outs = self._fp32().run(None, feed)[1:]
                    caches = {name: c.copy() for name, c in caches.items()}
                    for (name, _, _), rows in zip(past, outs):
                        caches[name][:, :, start:start + s] = rows

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:
        self._feeds = self._generate()


def static_int8(model: onnx.ModelProto, nodes: list[str], reader: WindowReader, work: Path) -> onnx.ModelProto:
    """``quantize_static`` (QDQ): int8 per-channel weights, uint8 activations with MinMax-calibrated ranges.

    Only the MatMul *inputs* get Q/DQ pairs: by default the tool also quantizes each MatMul's
    output, and a per-tensor uint8 range on the residual stream (w_down's output carries the
    first token's "massive activations", thousands of times the typical value) destroyed the
    model (SmolLM2 held-out perplexity x5.2; x2.6 with outputs left float).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    options = {"MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]}

    def run(src, dst, external):
        quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
                        per_channel=True, reduce_range=False, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_quantize=nodes, use_external_data_format=external,
                        calibrate_method=CalibrationMethod.MinMax, extra_options=options)

    return _run_tool(model, work, "static", run)


# -- embedding -------------------------------------------------------------------------------------


def int8_embedding(model: onnx.ModelProto, embedding: str, head_weight: str | None) -> str:
    """Make the embedding Gather read int8 rows and dequantize them; return how it is stored.

    ``head_weight``: the tied LM head's weight name. If the head was quantized to int8 the
    gather reads its weight instead of a copy: either ``<w>_Q8`` (``MatMulNBits``, uint8
    ``[vocab, K/block, block]``, scales ``[vocab, K/block]``, zero point 128) or
    ``<w>_quantized`` (QDQ, int8 ``[K, vocab]``, one scale per vocab column, zero point 0).
    Otherwise the table gets its own int8 copy with one scale per row.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    node = next(n for n in graph.node if n.name == embedding)
    ids, out = node.input[1], node.output[0]
    table = inits[node.input[0]]
    vocab, dim = (int(d) for d in table.dims)
    p = embedding
    extra = [numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{p}_axes")]
    nbits_w, qdq_w = inits.get(f"{head_weight}_Q8"), inits.get(f"{head_weight}_quantized")
    zp = inits.get(f"{head_weight}_zero_point") or inits.get(f"{head_weight}_zero_points")
    if head_weight and nbits_w is not None and zp is None and nbits_w.dims[0] == vocab:
        kb, block = int(nbits_w.dims[1]), int(nbits_w.dims[2])
        sname, how = f"{head_weight}_scales", SHARED
        extra += [numpy_helper.from_array(np.array(128.0, dtype=np.float32), f"{p}_zero_point"),
                  numpy_helper.from_array(np.array([0, 0, kb * block], dtype=np.int64), f"{p}_flat")]
        nodes = [helper.make_node("Gather", [nbits_w.name, ids], [f"{p}_blocks_q"], name=f"{p}_gather_int8", axis=0),
                 helper.make_node("Cast", [f"{p}_blocks_q"], [f"{p}_blocks_u"], name=f"{p}_cast", to=TensorProto.FLOAT),
                 helper.make_node("Sub", [f"{p}_blocks_u", f"{p}_zero_point"], [f"{p}_blocks"], name=f"{p}_center"),
                 helper.make_node("Gather", [sname, ids], [f"{p}_scale"], name=f"{p}_gather_scale", axis=0),
                 helper.make_node("Unsqueeze", [f"{p}_scale", f"{p}_axes"], [f"{p}_scale_col"], name=f"{p}_unsqueeze"),
                 helper.make_node("Mul", [f"{p}_blocks", f"{p}_scale_col"], [f"{p}_rows_blocks"],
                                  name=f"{p}_dequantize"),
                 helper.make_node("Reshape", [f"{p}_rows_blocks", f"{p}_flat"],
                                  [f"{p}_rows_padded" if kb * block != dim else out], name=f"{p}_rows")]
        if kb * block != dim:  # MatMulNBits pads K to whole blocks
            extra += [numpy_helper.from_array(np.array([0], dtype=np.int64), f"{p}_start"),
                      numpy_helper.from_array(np.array([dim], dtype=np.int64), f"{p}_end")]
            nodes.append(helper.make_node("Slice", [f"{p}_rows_padded", f"{p}_start", f"{p}_end", f"{p}_axes"],
                                          [out], name=f"{p}_unpad"))
    else:
        if (head_weight and qdq_w is not None and qdq_w.data_type == TensorProto.INT8
                and list(qdq_w.dims) == [dim, vocab] and (zp is None or not numpy_helper.to_array(zp).any())):
            qname, sname, how = qdq_w.name, f"{head_weight}_scale", SHARED
            rows = [helper.make_node("Gather", [qname, ids], [f"{p}_cols"], name=f"{p}_gather_int8", axis=1),
                    helper.make_node("Transpose", [f"{p}_cols"], [f"{p}_rows"], name=f"{p}_to_rows", perm=[1, 2, 0])]
        else:
            q, scale = quantize_per_channel(numpy_helper.to_array(table).astype(np.float32), axis=1)
            qname, sname, how = "tok_embeddings.weight_quantized", "tok_embeddings.weight_scale", OWN
            extra += [numpy_helper.from_array(q, qname), numpy_helper.from_array(scale, sname)]
            rows = [helper.make_node("Gather", [qname, ids], [f"{p}_rows"], name=f"{p}_gather_int8", axis=0)]
        nodes = rows + [
            helper.make_node("Cast", [f"{p}_rows"], [f"{p}_float"], name=f"{p}_cast", to=TensorProto.FLOAT),
            helper.make_node("Gather", [sname, ids], [f"{p}_scale"], name=f"{p}_gather_scale", axis=0),
            helper.make_node("Unsqueeze", [f"{p}_scale", f"{p}_axes"], [f"{p}_scale_col"], name=f"{p}_unsqueeze"),
            helper.make_node("Mul", [f"{p}_float", f"{p}_scale_col"], [out], name=f"{p}_dequantize"),
        ]
    graph.initializer.extend(extra)
    i = list(graph.node).index(node)
    graph.node.remove(node)
    for k, n in enumerate(nodes):
        graph.node.insert(i + k, n)
    if not any(table.name in n.input for n in graph.node):
        graph.initializer.remove(table)
    return how


# -- counting --------------------------------------------------------------------------------------


def count_quantized(model: onnx.ModelProto, linears: list[LinearNode]) -> dict[str, Any]:
    """What the final graph really holds, per linear: its weight's storage and the op that uses it."""
    graph = model.graph
    dtype = {t.name: t.data_type for t in graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    per: dict[str, dict[str, Any]] = {}
    for lin in linears:
        names = [n for n in dtype if (n == lin.weight or n.startswith(lin.weight + "_")) and n in users]
        ints = [n for n in names if dtype[n] in _INT and not n.endswith(("_zero_point", "_zero_points"))]
        if not ints:
            per[lin.module] = {"weight": "fp32", "op": "MatMul"}
            continue
        user = users[ints[0]][0]
        bits = _INT[dtype[ints[0]]]
        if user.op_type == "MatMulNBits":
            bits = next(helper.get_attribute_value(a) for a in user.attribute if a.name == "bits")
        per[lin.module] = {"weight": f"int{bits}", "op": user.op_type}
    return per


def embedding_storage(model: onnx.ModelProto) -> str:
    """``int8`` if the gather that reads ``input_ids`` reads an integer table, else ``fp32``."""
    dtype = {t.name: t.data_type for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("Gather", "GatherBlockQuantized") and "input_ids" in n.input[1:] and n.input[0] in dtype:
            if dtype[n.input[0]] in _INT:
                return f"int{_INT[dtype[n.input[0]]]}"
    return "fp32"


# -- the entry point -----------------------------------------------------------------------------

ACTIVATIONS = {
    "w8a8": f"int8 per block of {W8_BLOCK} along K, quantized at run time (MatMulNBits accuracy_level 4)",
    "w8": "float (weights dequantized once at load: session.disable_quant_qdq)",
    "w4a8": "int8 per block of group_size along K, quantized at run time (MatMulNBits accuracy_level 4)",
    "w8a8-static": "uint8 per tensor, ranges calibrated (MinMax) on the calibration windows",
}


def quantize_file(src: Path, spec: QuantSpec, calibration: list[list[int]] | None = None,
                  chunk: int = 512) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Quantize the fp32 graph in ``src`` per ``spec``; return the final model (not saved) and the
    ``quantization`` report. ``chunk``: the longest sequence the graph takes (calibration feeds)."""
    _quiet_tool_logs()
    scheme = spec.scheme
    if scheme not in ACTIVATIONS:
        raise ConversionError(f"the onnx lowering has no mapping for scheme {scheme!r}")
    if scheme == "w8a8-static" and not calibration:
        raise ConversionError("w8a8-static needs calibration windows (LowerOptions.calibration)")
    head_on = spec.lm_head != "fp32"
    prep = prepare(onnx.load(str(src)), untie_head=head_on)
    if not prep.linears:
        raise ConversionError(f"{src.name}: found no linear layers to quantize (was it exported by edgelm?)")
    model = prep.model
    head = [lin for lin in prep.linears if lin.module == HEAD and head_on]
    body = [lin for lin in prep.linears if lin.module != HEAD]
    if scheme == "w8a8":
        model = nbits(model, [lin.node for lin in body + head], bits=8, block_size=W8_BLOCK, accuracy_level=4,
                      symmetric=True)
    elif scheme == "w8":
        model = weight_only_int8(model, body + head)
    elif scheme == "w4a8":
        if spec.lm_head == "int8":
            model = nbits(model, [lin.node for lin in head], bits=8, block_size=W8_BLOCK, accuracy_level=4,
                          symmetric=True)
        int4 = body + (head if spec.lm_head == "scheme" else [])
        if spec.int4_symmetric:  # MatMulNBits' own form: zero point 8, no block-sum matmul
            model = nbits(model, [lin.node for lin in int4], bits=4, block_size=spec.group_size, accuracy_level=4,
                          symmetric=True)
        else:
            model = blocks_with_minimum(model, int4, spec.group_size)
    else:
        with tempfile.TemporaryDirectory(prefix="edgelm-onnx-quant-") as tmp:
            model = static_int8(model, [lin.node for lin in body + head], WindowReader(src, calibration, chunk),
                                Path(tmp))
    per = count_quantized(model, prep.linears)
    note = None
    if prep.embedding is not None and spec.embedding == "int8":
        head_int = HEAD in per and per[HEAD]["weight"] != "fp32"
        if prep.tied and not head_int:
            note = "left fp32: it is tied to the fp32 lm_head, one table serves both"
        else:
            note = int8_embedding(model, prep.embedding, head[0].weight if prep.tied and head else None)
    quantized = [m for m, d in per.items() if d["weight"] != "fp32"]
    ops: dict[str, int] = {}
    weights: dict[str, int] = {}
    for d in per.values():
        ops[d["op"]] = ops.get(d["op"], 0) + 1
        weights[d["weight"]] = weights.get(d["weight"], 0) + 1
    report = {
        "tool": TOOL,
        "linear_total": len(per),
        "linear_quantized": len(quantized),
        "linear_left_fp32": sorted(set(per) - set(quantized)),
        "embedding": embedding_storage(model),
        "lm_head": per[HEAD]["weight"] if HEAD in per else None,
        "weights": weights,
        "ops": ops,
        "activations": ACTIVATIONS[scheme],
    }
    if note:
        report["embedding_note"] = note
    if scheme == "w4a8":
        report["group_size"] = spec.group_size
        report["zero_point"] = ("symmetric" if spec.int4_symmetric
                                else "float minimum per block (w = scale * q + minimum)")
    if scheme in ("w8a8", "w4a8") and head:
        report["lm_head_block_size"] = W8_BLOCK if per[HEAD]["weight"] == "int8" else spec.group_size
    if scheme == "w8a8-static":
        report["calibration"] = {"windows": len(calibration), "tokens": sum(len(w) for w in calibration),
                                 "method": "MinMax"}
    return model, report


def session_config(scheme: str) -> dict[str, str]:
    """ONNX Runtime session config entries a bundle of ``scheme`` needs (``io.session_config``)."""
    return dict(W8_SESSION_CONFIG) if scheme == "w8" else {}
