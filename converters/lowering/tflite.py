"""LiteRT (TFLite) lowering: one ``.tflite`` with a ``decode`` signature and fixed-length prefill signatures.

LiteRT has no dynamic shapes, so the file holds one signature per call shape, all
over one copy of the weights (litert-torch deduplicates constants across
signatures; a tied embedding / LM head is one buffer):

* ``decode`` — one token: ``tokens[1, 1]``, ``input_pos[1]`` and the KV cache;
* ``prefill_<P>`` — P tokens, plus ``last_index[1]``: which position's logits to return.
  The runtime picks the smallest P that holds a chunk and pads it on the right; pads
  come after every real token, so the causal mask already hides them, and
  ``last_index`` returns the logits of the last *real* token.

The KV cache is functional: every layer's K and V (``[1, kv_heads, max_context,
head_dim]``, the canonical layout) are inputs, and the outputs are the logits and the
K/V rows of the new positions (``[1, kv_heads, P, head_dim]``), which the runtime
writes into the cache it keeps. The graph never copies the cache: attention scores
the old rows (read-only; rows at or after ``input_pos`` are masked) and the new rows
separately and joins the two score blocks before the softmax. The canonical
attention would ``index_copy`` the rows into the cache first, which LiteRT lowers to
a full cache copy per layer per call (a ``STABLEHLO_SCATTER``), and multiplying by
the transposed cache would add a ``TRANSPOSE`` of it; for decode the step multiplies
the cache by the transposed query instead and transposes the small score block.

Integer inputs are int32 in the file. Everything else is the canonical decoder's own
modules and weights; the parity gate runs this file against the eager decoder.

Quantized schemes (``w8``, ``w8a8``, ``w4a8``) are applied to the converted float file
with ai-edge-quantizer (see :func:`quantize_tflite`): the model's linears are found by
their weight bytes, the embedding lookup by its op, and only those are quantized, so the
RMSNorm and RoPE matmuls stay float as in the other formats. The signatures keep their
I/O, and the weights stay shared across signatures. ``w8a8-static`` is not offered:
full-integer activations through attention and the cache I/O are a different graph.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from edgelm.converters.lowering import Lowered, LowerOptions, register_lowering
from edgelm.converters.model import ShortConv, attention_mask, soft_cap
from edgelm.converters.quant import smooth_activations
from edgelm.errors import ConversionError, FormatError

log = logging.getLogger(__name__)

#: Prefill signature lengths when the options name none. Measured on SmolLM2-135M (fp32,
#: 2 x86 cores): prefill throughput plateaus at 128 tokens per call (a 512 call was no faster
#: per token), while every signature costs a full copy of the weights in RAM, because the
#: interpreter's XNNPACK delegate packs the weights once per subgraph (about +540 MB each).
#: So: 128 for throughput (longer prompts are chunked), 32 so that short follow-up turns do
#: not pay for 128 positions. The largest is capped by ``max_prefill`` and ``max_context``.
DEFAULT_PREFILL_LENGTHS = (32, 128)
#: Shorter chunks go through ``decode`` token by token (a 1-token prefill is a decode).
MIN_PREFILL = 2
DECODE = "decode"
PREFILL = "prefill_{length}"
K_CACHE, V_CACHE = "k_cache_{layer}", "v_cache_{layer}"
K_NEW, V_NEW = "k_new_{layer}", "v_new_{layer}"


def choose_prefill_lengths(requested: Sequence[int], max_prefill: int, max_context: int) -> tuple[int, ...]:
    """The prefill signature lengths: ``requested`` (or the defaults) capped by ``max_prefill`` and
    ``max_context``. The largest is the longest chunk one prefill call takes; a cap below the
    largest default becomes a length of its own."""
    cap = min(int(max_prefill), int(max_context))
    if cap < MIN_PREFILL:
        raise ConversionError(f"max_prefill {max_prefill} / max_context {max_context} leave no room for a prefill "
                              f"signature (need at least {MIN_PREFILL} tokens)")
    if requested:
        small = [n for n in requested if int(n) < MIN_PREFILL]
        if small:
            raise ConversionError(f"prefill lengths must be at least {MIN_PREFILL}, got {list(requested)}; "
                                  "one-token chunks run through decode")
        return tuple(sorted({min(int(n), cap) for n in requested}))
    return tuple(sorted({n for n in DEFAULT_PREFILL_LENGTHS if n < cap} | {min(cap, max(DEFAULT_PREFILL_LENGTHS))}))


def _attention(attn, x, cos, sin, rot, k_cache, v_cache, mask):
    """Grouped-query attention over a read-only cache plus the S new rows.

    Same math as the canonical ``Attention`` (cache rows are ``[1, KV, T, D]``); returns
    the block output and the new K/V rows ``[1, KV, S, D]``. ``mask`` is ``[S, T + S]``.
    """
    q, k, v = attn._qkv(x, cos, sin, rot)  # q: [B, S, H, D]; k, v: [B, S, KV, D]
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    b, s, h, d = q.shape
    g = h // attn.n_kv
    # The scale goes on q (smaller than the scores), unless q comes straight out of wq (GPT-2: no
    # RoPE, no q norm): the converter would fold the constant into wq's weight, which the
    # quantizer then no longer finds. There it goes on the scores.
    scale_q = attn.rope or attn.qk_norm
    q = q.transpose(1, 2).reshape(b, attn.n_kv, g * s, d)
    if scale_q:
        q = q * (1.0 / math.sqrt(d))
    if g * s < d:  # decode: transposing the [g*S, T] scores is cheaper than the [T, D] cache
        old = torch.matmul(k_cache, q.transpose(-1, -2)).transpose(-1, -2)
    else:
        old = torch.matmul(q, k_cache.transpose(-1, -2))
    new = torch.matmul(q, k.transpose(-1, -2))
    scores = torch.cat((old, new), dim=-1)
    if not scale_q:
        scores = scores * (1.0 / math.sqrt(d))
    scores = soft_cap(scores, attn.softcap) + mask.repeat(g, 1)  # Gemma 2 caps its scores
    p = torch.softmax(scores, dim=-1)
    t = k_cache.shape[2]
    out = torch.matmul(p[..., :t], v_cache) + torch.matmul(p[..., t:], v)
    out = out.view(b, h, s, d).transpose(1, 2).reshape(b, s, h * d)
    return attn.wo(out), k, v


class LiteRTStep(nn.Module):
    """One fixed-length call of a canonical :class:`Decoder` with the cache as inputs.

    ``forward(tokens[1, S] int32, input_pos[1] int32, k_cache, v_cache, last_index[1] int32)``
    returns ``{"logits": [1, vocab], "k_new_i": [1, KV, S, D], "v_new_i": ...}``. Cache
    rows at or after ``input_pos`` are never read; positions past the window (padding
    only) reuse the last rotary row. Several steps share one decoder, so the exported
    signatures share its weights.
    """

    def __init__(self, decoder: nn.Module, seq_len: int) -> None:
        super().__init__()
        self.decoder = decoder
        self.seq_len = seq_len
        t = decoder.cfg.max_context
        self.register_buffer("cache_index", torch.arange(t, dtype=torch.int32), persistent=False)
        self.register_buffer("offsets", torch.arange(seq_len, dtype=torch.int32), persistent=False)
        self.register_buffer("causal", torch.triu(torch.full((seq_len, seq_len), float("-inf")), diagonal=1),
                             persistent=False)
        self.window = decoder.cfg.sliding_window
        if self.window is not None:  # the new rows' part of the sliding-window layers' mask
            self.register_buffer("local_causal", attention_mask(torch.arange(seq_len), seq_len, self.window),
                                 persistent=False)

    def forward(self, tokens, input_pos, k_cache, v_cache, last_index=None):
        m, s, t = self.decoder, self.seq_len, self.decoder.cfg.max_context
        start = input_pos[0]
        pos = torch.clamp(start + self.offsets, max=t - 1)
        old = torch.where(self.cache_index < start, 0.0, float("-inf"))
        mask = torch.cat((old[None, :].expand(s, t), self.causal), dim=1)
        if self.window is not None:  # cache rows within the window of each query: (pos - window, start)
            first = (start + self.offsets - self.window)[:, None]
            old_local = torch.where((self.cache_index[None, :] < start) & (self.cache_index[None, :] > first),
                                    0.0, float("-inf"))
            local_mask = torch.cat((old_local, self.local_causal), dim=1)
        x = m.embed(tokens, pos)
        rotary = m._rotary(None, pos, s)
        out = {}
        for i, block in enumerate(m.layers):
            cos, sin = rotary[block.local_rope]
            layer_mask = mask if block.attn.window is None else local_mask
            h = block.attn_norm(x)
            if isinstance(block.attn, ShortConv):  # LFM2's convolution layers: the rows before `start`, then ours
                c_gate, rows = block.attn.gate_and_rows(h)
                a = block.attn.mix(c_gate, block.attn.earlier(k_cache[i], v_cache[i], start, 2), rows)
                k, v = (r.transpose(1, 2) for r in block.attn.halves(rows))
            else:
                a, k, v = _attention(block.attn, h, cos, sin, m.rope_rot, k_cache[i], v_cache[i], layer_mask)
            x = block.residual(x, h, a)
            out[K_NEW.format(layer=i)], out[V_NEW.format(layer=i)] = k, v
        x = x[:, -1:, :] if last_index is None else x.index_select(1, last_index)
        return {"logits": m.head(x)[:, -1, :], **out}


def sample_inputs(cfg, seq_len: int) -> dict[str, object]:
    """Example inputs of the ``seq_len`` signature (int32 integers, zero caches)."""
    kw: dict[str, object] = {
        "tokens": torch.zeros(1, seq_len, dtype=torch.int32),
        "input_pos": torch.zeros(1, dtype=torch.int32),
        "k_cache": [torch.zeros(cfg.kv_cache_shape(i)) for i in range(cfg.n_layers)],
        "v_cache": [torch.zeros(cfg.kv_cache_shape(i)) for i in range(cfg.n_layers)],
    }
    if seq_len > 1:
        kw["last_index"] = torch.zeros(1, dtype=torch.int32)
    return kw


@contextlib.contextmanager
def _litert_progress(enabled: bool) -> Iterator[None]:
    """litert-torch prints its own progress to stdout; show it only when debugging."""
    old = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "y" if enabled else "n"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = old


def _io(cfg, lengths: tuple[int, ...]) -> dict:
    names = {"tokens": "tokens", "input_pos": "input_pos", "last_index": "last_index", "logits": "logits",
             "k_cache": K_CACHE, "v_cache": V_CACHE, "k_new": K_NEW, "v_new": V_NEW}
    return {
        "decode": DECODE,
        "prefill": {str(n): PREFILL.format(length=n) for n in lengths},
        "prefill_lengths": list(lengths),
        "max_prefill": max(lengths),
        "min_prefill": MIN_PREFILL,
        "names": names,
        "int_dtype": "int32",
        "kv_cache": {
            "kind": "inputs",
            "layout": ["batch", "kv_heads", "max_context", "head_dim"],
            "dtype": "float32",
            "update": "the runtime writes the k_new/v_new rows [1, kv_heads, S, head_dim] at input_pos..+S-1 "
                      "(only the real, unpadded rows); rows at or after input_pos are never read",
        },
        "padding": "right; last_index (prefill only) selects the logits of the last real token",
    }


# --- quantization -------------------------------------------------------------------------------

#: ai-edge-quantizer runs on the converted file; litert-torch's own ``quant_config`` is a thin layer
#: over the same tool that selects ops by module-name regexes (its generative recipes), so it cannot
#: tell a projection from the RMSNorm / RoPE matmuls, which are FULLY_CONNECTED ops here too.
QUANT_TOOL = "ai-edge-quantizer"
#: Block sizes ai-edge-quantizer can write for int4 weights (``QuantGranularity.BLOCKWISE_<n>``).
BLOCK_SIZES = (32, 64, 128, 256)
#: scheme -> (weight bits of the body linears, activations quantized to int8 on the fly)
SCHEME_WEIGHTS = {"w8": (8, False), "w8a8": (8, True), "w4a8": (4, True)}
_FC, _EMBEDDING, _DEQUANTIZE = "FULLY_CONNECTED", "EMBEDDING_LOOKUP", "DEQUANTIZE"


def _digest(array) -> bytes:
    import hashlib

    import numpy as np

    return hashlib.blake2b(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data, digest_size=16).digest()


def _op_names(fm) -> list[str]:
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    return [names.get(max(c.builtinCode, c.deprecatedBuiltinCode), "?") for c in fm.operatorCodes]


def _find_targets(fm, model) -> tuple[dict[str, list[str]], list[str]]:
    """Which ops of the float file hold the model's weights: ``{linear name: [op scope, ...]}``
    (one scope per signature) and the scopes of the embedding lookups.

    A FULLY_CONNECTED op is a model linear when its constant weight has exactly the bytes of an
    ``nn.Linear`` weight. Tensor names are no help: the converter fuses them (``wk``'s output
    is named after ``wq`` and ``wk``) and the RMSNorm mean and the RoPE rotation are
    FULLY_CONNECTED ops with constant weights too; those stay float, as in the other formats.
    """
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

    by_digest: dict[bytes, list[str]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            by_digest.setdefault(_digest(mod.weight.detach().float().numpy()), []).append(name)
    ops = _op_names(fm)
    digests: dict[int, bytes] = {}
    linears: dict[str, list[str]] = {n: [] for names in by_digest.values() for n in names}
    embeddings = []
    for sg in fm.subgraphs:
        for op in sg.operators:
            kind = ops[op.opcodeIndex]
            if kind not in (_FC, _EMBEDDING) or len(op.inputs) < 2 or op.inputs[1] < 0:
                continue
            w = sg.tensors[op.inputs[1]]
            if fm.buffers[w.buffer].data is None:  # not a constant
                continue
            scope = fu.get_op_scope(op, sg.tensors)
            if kind == _EMBEDDING:
                embeddings.append(scope)
                continue
            if w.buffer not in digests:
                digests[w.buffer] = _digest(fu.get_tensor_data(w, fm.buffers))
            for name in by_digest.get(digests[w.buffer], ()):
                linears[name].append(scope)
    return linears, embeddings


def _weight_types(fm) -> dict[str, str]:
    """``{op scope: weight dtype}`` of every FULLY_CONNECTED / EMBEDDING_LOOKUP op with a constant
    (or dequantized constant) weight: ``float32``, ``int8``, ``int4``..."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    ops = _op_names(fm)
    out = {}
    for sg in fm.subgraphs:
        producer = {o: op for op in sg.operators for o in op.outputs}
        for op in sg.operators:
            if ops[op.opcodeIndex] not in (_FC, _EMBEDDING) or len(op.inputs) < 2 or op.inputs[1] < 0:
                continue
            w = sg.tensors[op.inputs[1]]
            src = producer.get(op.inputs[1])
            if src is not None and ops[src.opcodeIndex] == _DEQUANTIZE:  # weight-only: int -> DEQUANTIZE -> op
                w = sg.tensors[src.inputs[0]]
            if fm.buffers[w.buffer].data is None:
                continue
            out[fu.get_op_scope(op, sg.tensors)] = types[w.type]
    return out


def _untie_head(fm, head_scopes: Sequence[str]) -> bool:
    """Give the LM head's FULLY_CONNECTED ops (in every signature) their own weight tensor over one new
    buffer, where they read the embedding lookup's tensor. Returns whether anything changed."""
    import copy as _copy

    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

    ops = _op_names(fm)
    heads = set(head_scopes)
    new_buffer: dict[int, int] = {}
    for sg in fm.subgraphs:
        lookups = {op.inputs[1] for op in sg.operators if ops[op.opcodeIndex] == _EMBEDDING}
        for op in sg.operators:
            if (ops[op.opcodeIndex] != _FC or op.inputs[1] not in lookups
                    or fu.get_op_scope(op, sg.tensors) not in heads):
                continue
            shared = sg.tensors[op.inputs[1]]
            if shared.buffer not in new_buffer:
                buf = schema.BufferT()
                buf.data = fm.buffers[shared.buffer].data  # serialized as a second copy
                fm.buffers.append(buf)
                new_buffer[shared.buffer] = len(fm.buffers) - 1
            own = _copy.copy(shared)
            own.name = fu.get_tensor_name(shared).encode() + b"/lm_head"
            own.buffer = new_buffer[shared.buffer]
            sg.tensors.append(own)
            op.inputs = [*op.inputs[:1], len(sg.tensors) - 1, *op.inputs[2:]]
    return bool(new_buffer)


def _op_config(bits: int, granularity, dynamic: bool):
    """Weights of ``bits`` (symmetric); ``dynamic``: the kernel quantizes activations to int8 on the
    fly (integer compute), else an explicit DEQUANTIZE feeds a float op (weight-only)."""
    from ai_edge_quantizer import qtyping

    return qtyping.OpQuantizationConfig(
        weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=bits, symmetric=True, granularity=granularity),
        compute_precision=qtyping.ComputePrecision.INTEGER if dynamic else qtyping.ComputePrecision.FLOAT,
        explicit_dequantize=not dynamic)


def check_quant(spec) -> None:
    """Fail before the (long) conversion if ``spec`` asks for something the quantizer cannot write."""
    if spec.scheme == "w4a8" and spec.group_size not in BLOCK_SIZES:
        raise FormatError(f"the tflite format writes int4 weights in blocks of {', '.join(map(str, BLOCK_SIZES))} "
                          f"(ai-edge-quantizer), not {spec.group_size}; choose one of those group sizes")


def _exactly(scopes: Sequence[str]) -> str:
    import re

    return "^(?:" + "|".join(re.escape(s) for s in scopes) + ")$"


def quantize_tflite(path: Path, model: nn.Module, spec) -> dict:
    """Quantize the float ``.tflite`` at ``path`` in place with ai-edge-quantizer; return the report.

    * ``w8``: int8 weights per output channel, explicitly dequantized into float ops (weight-only).
      Smaller file, fp32 compute; at run time LiteRT dequantizes them once per signature, so it
      takes *more* memory than fp32 (the XNNPACK delegate has no float x int8 kernel to run them);
    * ``w8a8``: int8 weights per output channel, int8 activations quantized on the fly (dynamic range);
    * ``w4a8``: int4 weights in blocks of ``spec.group_size`` along the input (fp16 scales), dynamic
      int8 activations. A linear whose ``in_features`` the block size does not divide stays float
      and is listed.

    The embedding lookup is int8 per row (``spec.embedding``); the LM head follows ``spec.lm_head``
    (int8 per channel, the body scheme, or fp32). A tied embedding / LM head stays one int8 buffer
    when both are int8 per row; when they differ the head gets its own copy first (one per
    precision, shared by every signature: left to itself the quantizer would copy the tensor once
    per signature). Weights stay shared across signatures. The counts come from the written file,
    not from the recipe.
    """
    from ai_edge_quantizer import qtyping, quantizer
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

    check_quant(spec)
    bits, dynamic = SCHEME_WEIGHTS[spec.scheme]
    G = qtyping.QuantGranularity
    body_granularity = G(f"BLOCKWISE_{spec.group_size}") if bits == 4 else G.CHANNELWISE
    body = _op_config(bits, body_granularity, dynamic)
    int8 = _op_config(8, G.CHANNELWISE, dynamic)
    t0 = time.perf_counter()
    data = path.read_bytes()
    fm = fu.read_model(data)
    linears, embeddings = _find_targets(fm, model)
    modules = dict(model.named_modules())
    head = "output"
    blocked = [n for n in linears if n != head or spec.lm_head == "scheme"]  # the linears in int4 blocks
    skipped = sorted(n for n in blocked if bits == 4 and modules[n].in_features % spec.group_size)
    if skipped:
        log.warning("%d linear(s) have in_features not divisible by the block size %d and stay float: %s",
                    len(skipped), spec.group_size, ", ".join(skipped[:4]) + (" ..." if len(skipped) > 4 else ""))
    head_config = None if head in skipped else {"int8": int8, "scheme": body, "fp32": None}[spec.lm_head]
    embedding_config = _op_config(8, G.CHANNELWISE, True) if spec.embedding == "int8" else None

    def weights_of(config):
        return None if config is None else config.weight_tensor_config

    if weights_of(head_config) != weights_of(embedding_config) and _untie_head(fm, linears.get(head, ())):
        # A tied table that the lookup and the head store differently: give the head its own buffer
        # first. Left to itself, the quantizer would copy the shared buffer once per *signature*.
        from ai_edge_litert.tools import flatbuffer_utils

        data = flatbuffer_utils.convert_object_to_bytearray(fm)
    del fm
    q = quantizer.Quantizer(data)
    fc = qtyping.TFLOperationName.FULLY_CONNECTED
    body_scopes = [s for n, scopes in linears.items() if n != head and n not in skipped for s in scopes]
    if body_scopes:
        q.update_quantization_recipe(_exactly(body_scopes), fc, body)
    if head_config is not None and linears.get(head):
        q.update_quantization_recipe(_exactly(linears[head]), fc, head_config)
    if embedding_config is not None and embeddings:
        # the lookup reads int8 rows and scales them (no DEQUANTIZE of the whole table)
        q.update_quantization_recipe(_exactly(embeddings), qtyping.TFLOperationName.EMBEDDING_LOOKUP,
                                     embedding_config)
    if not q.get_quantization_recipe():
        raise ConversionError("found no weights to quantize in the converted model")
    debug = log.isEnabledFor(logging.DEBUG)
    with contextlib.redirect_stderr(sys.stderr if debug else io.StringIO()):  # its progress bars
        result = q.quantize(enable_progress_bar=debug, enable_progress_report=False)
    quantized = result.quantized_model
    path.write_bytes(quantized)
    del q, result, data
    types = _weight_types(fu.read_model(quantized))
    del quantized

    def dtype_of(scopes: Sequence[str]) -> str:
        found = {types.get(s, "missing") for s in scopes}
        return found.pop() if len(found) == 1 else "mixed(" + ",".join(sorted(found)) + ")"

    dtypes = {n: dtype_of(scopes) for n, scopes in linears.items() if scopes}
    done = sorted(n for n, t in dtypes.items() if t in ("int8", "int4"))
    fc_types: dict[str, int] = {}
    for t in types.values():
        fc_types[t] = fc_types.get(t, 0) + 1
    report = {
        "tool": QUANT_TOOL,
        "linear_total": len(linears),
        "linear_quantized": len(done),
        "linear_left_fp32": sorted(set(linears) - set(done)),
        "embedding": dtype_of(embeddings) if embeddings else "none",
        "lm_head": dtypes.get(head, "fp32"),
        "weights": f"int{bits}",
        "granularity": "blockwise" if bits == 4 else "per-channel",
        "block_size": spec.group_size if bits == 4 else None,
        # ai-edge-quantizer's blockwise int4 is symmetric; a float minimum per block has no LiteRT kernel
        **({"zero_point": "symmetric"} if bits == 4 else {}),
        "activations": "int8 dynamic" if dynamic else "float (weights dequantized)",
        "runtime": ("integer kernels on float activations (XNNPACK dynamic range)" if dynamic else
                    "LiteRT dequantizes the weights to float when it loads the file (per signature): "
                    "a smaller file, not less memory; w8a8 needs less"),
        "weight_ops_by_dtype": fc_types,  # FULLY_CONNECTED + EMBEDDING_LOOKUP ops, all signatures
        "quantize_s": round(time.perf_counter() - t0, 2),
    }
    if dtypes.get(head) == "float32":
        report["lm_head"] = "fp32"
    if report["embedding"] == "float32":
        report["embedding"] = "fp32"
    missing = [n for n, scopes in linears.items() if not scopes]
    if missing:  # the converter changed these weights (e.g. folded something in): not found, not quantized
        report["linear_not_found"] = missing
    return report


@register_lowering("tflite", ".tflite", schemes=("fp32", "w8", "w8a8", "w4a8"))
def lower_tflite(model, out: Path, opts: LowerOptions) -> Lowered:
    """Export ``model`` (a canonical Decoder) to ``out`` with decode and prefill signatures."""
    import litert_torch

    cfg = model.cfg
    lengths = choose_prefill_lengths(opts.prefill_lengths, opts.max_prefill, cfg.max_context)
    if opts.quant.quantized:
        check_quant(opts.quant)
    m = copy.deepcopy(model).eval()
    smoothing = None
    if opts.quant.smooth:
        smoothing = smooth_activations(model, m, opts.calibration, opts.quant.smooth)
    if cfg.tie_embeddings:  # one tensor, so the file stores it once
        m.output.weight = m.tok_embeddings.weight
    steps = {DECODE: 1, **{PREFILL.format(length=n): n for n in lengths}}
    t0 = time.perf_counter()
    converter = None
    for name, n in steps.items():
        step = LiteRTStep(m, n).eval()
        kw = sample_inputs(cfg, n)
        converter = (litert_torch.signature(name, step, sample_kwargs=kw) if converter is None
                     else converter.signature(name, step, sample_kwargs=kw))
    with torch.no_grad(), _litert_progress(log.isEnabledFor(logging.DEBUG)):
        try:
            edge = converter.convert()
        except Exception as e:  # torch.export and the MLIR converter raise many types
            raise ConversionError(f"litert-torch could not convert the decoder: {type(e).__name__}: {e}") from e
        t1 = time.perf_counter()
        edge.export(str(out))
    size = out.stat().st_size
    weights = cfg.num_parameters() * 4
    quant_report = None
    if opts.quant.quantized:
        quant_report = quantize_tflite(out, m, opts.quant)
        if smoothing:
            quant_report["smoothing"] = smoothing
        log.info("quantized %s to %s: %.1f MB -> %.1f MB in %.0f s", out.name, opts.quant.scheme, size / 1e6,
                 out.stat().st_size / 1e6, quant_report["quantize_s"])
    fp32_size, size = size, out.stat().st_size
    log.info("wrote %s (%.1f MB; fp32 weights %.1f MB) with signatures %s in %.0f s", out, size / 1e6,
             weights / 1e6, ", ".join(steps), time.perf_counter() - t0)
    if fp32_size > 1.25 * weights + (4 << 20):
        log.warning("%s is %.1f MB for %.1f MB of weights: weights may be stored more than once", out.name,
                    fp32_size / 1e6, weights / 1e6)
    report = {"signatures": steps, "file_bytes": size, "fp32_weight_bytes": weights,
              "convert_s": round(t1 - t0, 2), "export_s": round(time.perf_counter() - t1, 2)}
    if quant_report:
        report["fp32_file_bytes"] = fp32_size
        report["quantization"] = quant_report
    return Lowered(out, _io(cfg, lengths), report)
