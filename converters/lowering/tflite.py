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
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from edgelm.converters.lowering import Lowered, LowerOptions, register_lowering
from edgelm.errors import ConversionError

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
    q = q.transpose(1, 2).reshape(b, attn.n_kv, g * s, d) * (1.0 / math.sqrt(d))
    if g * s < d:  # decode: transposing the [g*S, T] scores is cheaper than the [T, D] cache
        old = torch.matmul(k_cache, q.transpose(-1, -2)).transpose(-1, -2)
    else:
        old = torch.matmul(q, k_cache.transpose(-1, -2))
    new = torch.matmul(q, k.transpose(-1, -2))
    scores = torch.cat((old, new), dim=-1) + mask.repeat(g, 1)
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

    def forward(self, tokens, input_pos, k_cache, v_cache, last_index=None):
        m, s, t = self.decoder, self.seq_len, self.decoder.cfg.max_context
        start = input_pos[0]
        pos = torch.clamp(start + self.offsets, max=t - 1)
        cos, sin = m.rope_cos[pos], m.rope_sin[pos]
        old = torch.where(self.cache_index < start, 0.0, float("-inf"))
        mask = torch.cat((old[None, :].expand(s, t), self.causal), dim=1)
        x = m.tok_embeddings(tokens)
        out = {}
        for i, block in enumerate(m.layers):
            a, k, v = _attention(block.attn, block.attn_norm(x), cos, sin, m.rope_rot, k_cache[i], v_cache[i], mask)
            x = x + a
            x = x + block.mlp(block.mlp_norm(x))
            out[K_NEW.format(layer=i)], out[V_NEW.format(layer=i)] = k, v
        x = x[:, -1:, :] if last_index is None else x.index_select(1, last_index)
        return {"logits": m.output(m.norm(x))[:, -1, :], **out}


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


@register_lowering("tflite", ".tflite")
def lower_tflite(model, out: Path, opts: LowerOptions) -> Lowered:
    """Export ``model`` (a canonical Decoder) to ``out`` with decode and prefill signatures."""
    import litert_torch

    cfg = model.cfg
    lengths = choose_prefill_lengths(opts.prefill_lengths, opts.max_prefill, cfg.max_context)
    m = copy.deepcopy(model).eval()
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
    log.info("wrote %s (%.1f MB; fp32 weights %.1f MB) with signatures %s in %.0f s", out, size / 1e6,
             weights / 1e6, ", ".join(steps), time.perf_counter() - t0)
    if size > 1.25 * weights + (4 << 20):
        log.warning("%s is %.1f MB for %.1f MB of weights: weights may be stored more than once", out.name,
                    size / 1e6, weights / 1e6)
    report = {"signatures": steps, "file_bytes": size, "fp32_weight_bytes": weights,
              "convert_s": round(t1 - t0, 2), "export_s": round(time.perf_counter() - t1, 2)}
    return Lowered(out, _io(cfg, lengths), report)
