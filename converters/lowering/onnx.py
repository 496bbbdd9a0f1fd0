"""ONNX lowering: one ``.onnx`` graph for prefill and decode, exported with ``torch.onnx.export(dynamo=True)``.

The graph is one step of the canonical Decoder in its *functional* mode (cache in, new
rows out), built from the Decoder's own modules, with the names ONNX Runtime tools expect::

    input_ids                     int64   [1, sequence_length]
    position_ids                  int64   [1, sequence_length]   start_pos, start_pos+1, ... (consecutive)
    logits_to_keep                int64   [num_logits]           indices into the sequence (HF's meaning)
    past_key_values.{i}.key|value float32 [1, kv_heads_i, max_context, head_dim]
      -> logits                   float32 [1, num_logits, vocab]  the positions logits_to_keep names
      -> present.{i}.key|value    float32 [1, kv_heads_i, sequence_length, head_dim]

``sequence_length`` is dynamic (1 .. ``max_prefill``), so one graph serves chunked
prefill and single-token decode (a second, static S=1 decode graph measured no faster).
``logits_to_keep`` is ``[S - 1]`` in prefill and decode, so the LM head runs once per
call; a speculative-decoding check passes ``0 .. S - 1`` and gets every position's logits
from the same graph (bundles written before it have no such input: last position only).
the KV cache is static (``max_context`` positions), and attention reads only its filled
part plus the new rows, ``[:start_pos + sequence_length]`` (see :class:`OnnxStep`).

**What ``present`` means.** ``present.{i}.*`` holds only the K/V rows of the
``sequence_length`` new positions, not the whole updated cache. The caller owns the
cache: it keeps one preallocated buffer per layer, passes it as ``past_key_values``
(the graph reads positions ``< start_pos`` from it and masks the rest) and writes
``present`` into it at ``[:, :, start_pos:start_pos + sequence_length]``. A decode step
therefore moves one row per layer across the runtime boundary instead of the whole
cache (design decision 6); the runtime binds the cache buffers once with I/O binding.
The same facts are in the manifest's ``io`` section and the model's ``metadata_props``.

Weights are stored inside ``model.onnx`` unless they are too big for protobuf's 2 GB
limit (or ``LowerOptions.extra["external_data"]`` is true): then they go to
``model.onnx.data`` beside it, which the bundle carries and the manifest names. A tied
embedding / LM head is one initializer used by both the Gather and the MatMul.

Quantized schemes (w8, w8a8, w4a8, w8a8-static) export the same fp32 graph to a scratch
folder and quantize that file with ``onnxruntime.quantization`` (:mod:`.onnx_quant`); the
report's ``quantization`` section counts what the final graph really holds. ONNX Runtime
session settings a scheme needs travel in the manifest's ``io.session_config``.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from edgelm.converters.lowering import FOLDED_DECODE, SYMMETRIC_ROWS, Lowered, LowerOptions, register_lowering
from edgelm.errors import ConversionError

log = logging.getLogger(__name__)

OPSET = 18
SEQ_AXIS = "sequence_length"
LOGITS_AXIS = "num_logits"
# Protobuf cannot hold a model over 2 GB; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024
PRESENT = "new_rows"
# What onnx_quant maps to onnxruntime.quantization (see there for the tools and ops).
SCHEMES = ("fp32", "w8", "w8a8", "w8a8-static", "w4a8")


#: The cache tensors of one layer, by the layer's cache type: an int8 cache has codes, then a scale per row
#: (``[1, kv_heads, max_context, 1]``), for K and for V.
CACHE_PARTS = {"fp32": ("key", "value"), "int8": ("key", "key_scale", "value", "value_scale")}


def cache_names(kinds: list[str], prefix: str) -> list[str]:
    """``{prefix}.{i}.{part}`` for each layer's cache type in ``kinds`` (``fp32`` or ``int8``)."""
    return [f"{prefix}.{i}.{part}" for i, kind in enumerate(kinds) for part in CACHE_PARTS[kind]]


def input_names(kinds: list[str]) -> list[str]:
    return ["input_ids", "position_ids", "logits_to_keep", *cache_names(kinds, "past_key_values")]


def output_names(kinds: list[str]) -> list[str]:
    return ["logits", *cache_names(kinds, "present")]


class OnnxStep(nn.Module):
    """What the ONNX graph computes: one functional Decoder step over flat tensors.

    It calls the canonical Decoder's own functional ``forward`` (nothing of the model is
    re-implemented here) with ``window_attention`` on, so attention covers only the filled
    *window* ``[0, start_pos + S)`` of the cache (``cache[:, :, :start_pos]`` joined with
    the new rows) instead of all ``max_context`` positions.

    Over the full ``max_context`` instead, every step transposes, scatters and soft-maxes
    the whole cache of every layer. SmolLM2-135M (max_context 2048, 2 threads, shared
    machine, ms/token at position 40 / 1900): full cache 115 / 113, windowed by config
    81 / 136, ``window_attention`` 76 / 99-116. The parity gate compares the exported graph
    with the eager Decoder on every conversion.
    """

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_to_keep: torch.Tensor,
                past: list[torch.Tensor]):
        caches, at = [], 0
        for kind in self.decoder.cache_kinds():  # the flat list, cut into each layer's cache tensors
            caches.append(tuple(past[at:at + len(CACHE_PARTS[kind])]))
            at += len(CACHE_PARTS[kind])
        logits, rows = self.decoder(input_ids, position_ids[:, 0], caches, logits_to_keep)
        return (logits, *(t for kv in rows for t in kv))


def functional_copy(model: nn.Module, kv_cache: str = "fp32") -> nn.Module:
    """A deep copy of ``model`` in functional mode (cache as inputs, of element type ``kv_cache``),
    last-position logits."""
    m = copy.deepcopy(model)
    for mod in (m, *(block.attn for block in m.layers)):
        mod.impl, mod.stateful = "plain", False
    for block in m.layers:  # a stateful model's cache buffers are not part of the graph
        for name in ("k_cache", "v_cache", "k_scales", "k_zeros", "v_scales", "v_zeros"):
            block.attn._buffers.pop(name, None)
    m.functional_cache(kv_cache)
    if m.cfg.tie_embeddings:  # keep one tensor for both uses, so it is stored once
        m.output.weight = m.tok_embeddings.weight
    m.full_logits = False
    m.window_attention = True
    return m.eval()


def _rename_axis(model, old: str, new: str) -> None:
    """Give the dynamic axis a readable name on the graph's inputs and outputs."""
    import onnx_ir as ir

    for value in (*model.graph.inputs, *model.graph.outputs):
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(new) if isinstance(d, ir.SymbolicDim) and d.value == old else d
                for d in value.shape]
        value.shape = ir.Shape(dims)


def _initializer_bytes(model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


@register_lowering("onnx", ".onnx", schemes=SCHEMES, kv_caches=("fp32", "int8"))
def lower_onnx(model, out: Path, opts: LowerOptions) -> Lowered:
    """Export ``model`` (a canonical Decoder) to ``out`` (+ ``out.data`` for large weights)."""
    cfg = model.cfg
    n = cfg.n_layers
    max_prefill = max(2, min(opts.max_prefill, cfg.max_context))
    step = OnnxStep(functional_copy(model, opts.kv_cache)).eval()
    kinds = step.decoder.cache_kinds()
    caches = [t for kv in step.decoder.empty_caches() for t in kv]
    sample = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([[3, 4]], dtype=torch.long),
              torch.tensor([0, 1], dtype=torch.long), caches)
    seq = torch.export.Dim(SEQ_AXIS, min=1, max=max_prefill)
    kept = torch.export.Dim(LOGITS_AXIS, min=1, max=max_prefill)
    dynamic = {"input_ids": {1: seq}, "position_ids": {1: seq}, "logits_to_keep": {0: kept},
               "past": [None] * len(caches)}
    with torch.no_grad(), warnings.catch_warnings():
        # the exporter's own notes: it cannot rename axes of a list input (done below) and a pytree deprecation
        warnings.filterwarnings("ignore", message=".*dynamic axes will not be renamed.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        try:
            program = torch.onnx.export(
                step, sample, dynamo=True, input_names=input_names(kinds), output_names=output_names(kinds),
                dynamic_shapes=dynamic, opset_version=OPSET, optimize=True, verbose=False, report=False,
            )
        except Exception as e:  # the exporter raises many types; surface them as one
            raise ConversionError(f"torch.onnx.export failed: {e}") from e
    graph = program.model
    got_in = [v.name for v in graph.graph.inputs]
    got_out = [v.name for v in graph.graph.outputs]
    if got_in != input_names(kinds) or got_out != output_names(kinds):
        raise ConversionError(f"the exported graph has unexpected io names: inputs {got_in[:4]}..., "
                              f"outputs {got_out[:4]}...")
    for sym, name in ((graph.graph.inputs[0].shape[1], SEQ_AXIS), (graph.graph.inputs[2].shape[0], LOGITS_AXIS)):
        if not isinstance(sym, int) and getattr(sym, "value", None) not in (None, name):
            _rename_axis(graph, sym.value, name)
    meta = {"edgelm.present": PRESENT, "edgelm.cache_layout": "batch,kv_heads,max_context,head_dim",
            "edgelm.max_context": str(cfg.max_context), "edgelm.max_prefill": str(max_prefill),
            "edgelm.kv_cache": opts.kv_cache}
    graph.metadata_props.update(meta)

    data = out.with_name(out.name + ".data")
    quant_report = None
    if not opts.quant.quantized:
        weights = _initializer_bytes(graph)
        external = bool(opts.extra.get("external_data", weights > EXTERNAL_DATA_THRESHOLD))
        program.save(out, external_data=external)
        opset = OPSET
    else:
        weights, external, opset, quant_report = _save_quantized(program, out, opts, max_prefill, meta)
    if external and not data.is_file():
        raise ConversionError(f"the ONNX exporter did not write the weight file {data.name}")
    size = out.stat().st_size + (data.stat().st_size if external else 0)
    log.info("wrote %s (%.1f MB, weights %.1f MB%s)", out, size / 1e6, weights / 1e6,
             f", external data {data.name}" if external else "")

    kv_heads = [int(h) for h in cfg.n_kv_heads]
    io = {
        "graph": "single",  # one graph, dynamic sequence_length, for prefill and decode
        "opset": opset,
        "max_prefill": max_prefill,
        "max_verify": max_prefill,  # a speculative check is one more call of the same graph
        "min_prefill": 1,
        "inputs": {
            "input_ids": {"dtype": "int64", "shape": [1, SEQ_AXIS]},
            "position_ids": {"dtype": "int64", "shape": [1, SEQ_AXIS],
                             "meaning": "consecutive positions start_pos .. start_pos + sequence_length - 1"},
            "logits_to_keep": {"dtype": "int64", "shape": [LOGITS_AXIS],
                               "meaning": "indices into the sequence whose logits to return"},
        },
        "outputs": {"logits": {"dtype": "float32", "shape": [1, LOGITS_AXIS, cfg.vocab_size],
                               "meaning": "the positions logits_to_keep names"}},
        "kv_cache": {
            "past": "past_key_values.{i}.key|value",
            "present": "present.{i}.key|value",
            "layout": ["batch", "kv_heads", "max_context", "head_dim"],
            "dtype": "float32",
            "layers": n,
            "kv_heads": kv_heads,
            "head_dim": cfg.head_dim,
            "max_context": cfg.max_context,
            "present_contains": PRESENT,
            "present_shape": ["batch", "kv_heads", SEQ_AXIS, "head_dim"],
            "update": "the caller writes present.{i}.* into its cache at [:, :, start_pos:start_pos+sequence_length]",
        },
        "kv_cache_dtype": opts.kv_cache,
        "data_file": data.name if external else None,
    }
    if opts.kv_cache == "int8":
        io["kv_cache"].update({
            "dtype": "int8", "parts": {kind: list(CACHE_PARTS[kind]) for kind in sorted(set(kinds))},
            "layer_parts": kinds,
            "quantization": "per position and head, symmetric: x = code * scale, code int8 in -127..127, scale "
                            "float32 of shape [batch, kv_heads, max_context, 1]",
        })
        io["kv_cache_decode"], io["kv_cache_rows"] = FOLDED_DECODE, SYMMETRIC_ROWS
    if quant_report is not None:
        from edgelm.converters.lowering.onnx_quant import session_config

        io["session_config"] = session_config(opts.quant.scheme)
    attention = "window_attention" if getattr(step.decoder, "window_attention", False) else "config_window"
    report = {"file_mb": round(size / 1e6, 1), "weights_mb": round(weights / 1e6, 1), "external_data": external,
              "opset": opset, "attention": attention}
    if quant_report is not None:
        report["quantization"] = quant_report
    return Lowered(out, io, report)


def _save_quantized(program, out: Path, opts: LowerOptions, max_prefill: int, meta: dict[str, str]):
    """Save the fp32 export to a scratch folder, quantize it (:mod:`.onnx_quant`) and write ``out``
    (+ ``out.data`` when large). Returns (weight bytes, external, opset, quantization report)."""
    import tempfile

    import onnx

    from edgelm.converters.lowering.onnx_quant import quantize_file

    with tempfile.TemporaryDirectory(prefix="edgelm-onnx-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        program.save(fp32, external_data=_initializer_bytes(program.model) > EXTERNAL_DATA_THRESHOLD)
        model, report = quantize_file(fp32, opts.quant, opts.calibration, chunk=max_prefill)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {**meta, "edgelm.scheme": opts.quant.scheme})
    weights = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    external = bool(opts.extra.get("external_data", weights > EXTERNAL_DATA_THRESHOLD))
    data = out.with_name(out.name + ".data")
    onnx.save_model(model, str(out), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), OPSET)
    return weights, external, opset, report
