"""The canonical decoder: one export-friendly definition for the Llama family, Qwen2/3, Gemma 1/2/3,
GPT-2, OPT, StableLM, Phi, GPT-NeoX, OLMo 2, EXAONE 4, Hunyuan and LFM2.

Read it like nanoGPT's ``model.py``: RMSNorm, rotary embeddings, grouped-query
attention and a SwiGLU MLP, with per-layer head counts and FFN widths (so pruned
models stay plain models) and a static KV cache of ``max_context`` positions. The other
families change a few parts, and :data:`edgelm.config.ARCH_TRAITS` says which: Qwen3 adds an
RMSNorm over each query and key head; Gemma 3 adds those, norms on the attention and MLP
outputs, GeGLU, a scaled embedding and a second rotary base; GPT-2 has LayerNorm, a learned
position embedding and a GELU MLP (OPT: a ReLU one); StableLM is a Llama with LayerNorm; Phi and
GPT-NeoX run attention and a GELU MLP side by side on each block's input; OLMo 2 and EXAONE 4
normalize the attention's and MLP's outputs instead of their inputs; Hunyuan normalizes queries
and keys after the rotary embedding; LFM2 puts a gated short convolution (:class:`ShortConv`) in
place of attention in most layers. Families that differ from one of these only by constants or
a layout (Granite, interleaved RoPE) are folded into the weights by :func:`state_dict_from_hf`.

The cache has two modes on the same weights:

* **stateful** — the cache lives in registered buffers updated in place; ExecuTorch
  exports them as mutable buffers that persist across calls. ``attention="executorch"``
  swaps the cache update and attention for ExecuTorch's fused ``llama::update_cache`` /
  ``llama::custom_sdpa`` kernels, which only attend to the filled part of the cache.
* **functional** — caches are inputs; the step returns logits and the new K/V rows, so
  a runtime can write them into its own preallocated buffers (ONNX, TFLite).

We do not export Hugging Face modeling code: its cache objects and dynamic paths
break the exporters (ExecuTorch and litert-torch keep their own definitions too).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from edgelm.config import KV_CACHE_DTYPES, ModelConfig

# "plain": index_copy_ into [B, KV, T, D] caches (the eager reference); "executorch": ExecuTorch's llama:: kernels
# (update_cache, custom_sdpa) on [B, T, KV, D] caches; "portable": the filled rows in plain ATen ops, for a .pte
# that must not load the llama:: kernels (see Attention._attend_portable)
ATTENTION_IMPLS = ("plain", "executorch", "portable")
SYMBOLIC_START_IMPLS = ("executorch", "portable")  # a .pte's: the start position is a symbolic integer


#: RoPE scaling types the canonical decoder computes as transformers does. ``dynamic`` (NTK) only
#: changes the frequencies past ``max_position_embeddings``, where edgelm never goes (the context is
#: capped there), so inside the context it is the plain rotary embedding. ``longrope`` (Phi-3.5,
#: Phi-4-mini) scales each frequency by ``short_factor`` while the sequence fits the pretraining
#: context and by ``long_factor`` past it; transformers switches per forward pass, a static table
#: cannot, so a bundle takes ``short_factor`` if its ``max_context`` fits that context (exactly
#: transformers' numbers there) and ``long_factor`` otherwise (transformers' numbers once a sequence
#: is longer than the pretraining context).
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


def rope_type(rope_scaling: dict | None) -> str:
    """The scaling type of a ``rope_scaling`` dict (``rope_type``, or the older ``type`` key)."""
    rs = rope_scaling or {}
    return rs.get("rope_type", rs.get("type", "default"))


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding (over its ``rotary_dim``), with Llama 3 / linear /
    YaRN / LongRoPE scaling."""
    hd = cfg.rotary_dim or cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rs = cfg.rope_scaling or {}
    kind = rope_type(rs)
    if kind in ("default", "dynamic"):
        return inv
    if kind == "linear":
        return inv / float(rs["factor"])
    if kind == "longrope":
        long = cfg.max_context > int(rs["original_max_position_embeddings"])
        return inv / torch.tensor(rs["long_factor" if long else "short_factor"], dtype=torch.float64)
    if kind == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs["original_max_position_embeddings"])
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(is_mid, mid, scaled)
    if kind == "yarn":
        # YaRN (arXiv 2309.00071) as transformers computes it: interpolate the low frequencies by
        # `factor`, keep the high ones, ramp linearly between the two correction dimensions.
        old_ctx = float(rs["original_max_position_embeddings"])
        factor = float(rs["factor"])
        fast, slow = float(rs.get("beta_fast") or 32), float(rs.get("beta_slow") or 1)

        def corr_dim(rotations: float) -> float:
            return hd * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

        lo, hi = corr_dim(fast), corr_dim(slow)
        if rs.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, hd - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = ((torch.arange(hd // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        return inv / factor * ramp + inv * (1 - ramp)
    raise NotImplementedError(f"rope scaling type {kind!r} is not supported yet")


def rope_attention_scale(cfg: ModelConfig) -> float:
    """Factor on cos and sin: YaRN's and LongRoPE's attention temperature, 1 for every other type."""
    rs = cfg.rope_scaling or {}
    if rope_type(rs) not in ("yarn", "longrope"):
        return 1.0
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    factor = float(rs["factor"])
    if rope_type(rs) == "longrope":
        old_ctx = float(rs["original_max_position_embeddings"])
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_ctx))

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if rs.get("mscale") and rs.get("mscale_all_dim"):
        return mscale(float(rs["mscale"])) / mscale(float(rs["mscale_all_dim"]))
    return mscale(1.0)


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position and head dimension, [max_context, head_dim]. With a partial
    ``rotary_dim`` the other dimensions get cos 1 and sin 0: they pass through unrotated."""
    freqs = torch.outer(torch.arange(cfg.max_context, dtype=torch.float64), rope_inv_freq(cfg))
    freqs = torch.cat((freqs, freqs), dim=-1)  # [T, R]: both halves of the rotated part share a frequency
    scale = rope_attention_scale(cfg)
    cos, sin = freqs.cos() * scale, freqs.sin() * scale
    rest = cfg.head_dim - freqs.shape[1]
    if rest:
        cos = torch.cat((cos, torch.ones(cfg.max_context, rest, dtype=cos.dtype)), dim=-1)
        sin = torch.cat((sin, torch.zeros(cfg.max_context, rest, dtype=sin.dtype)), dim=-1)
    return cos.float(), sin.float()


class RMSNorm(nn.Module):
    """RMSNorm whose mean of squares is a linear layer with one constant row of 1/dim.

    Same numbers as ``mean(-1)``, but a linear is delegated by XNNPACK where ``mean.dim``
    over the last axis is not: a reduction op would split every layer into extra
    delegate calls. ``F.linear`` rather than ``matmul``: a 3-D matmul decomposes into
    reshapes by the symbolic sequence length, which XNNPACK cannot take in a
    dynamic-length (prefill) graph.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("inv_dim", torch.full((1, dim), 1.0 / dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(F.linear(x * x, self.inv_dim) + self.eps) * self.weight


class LayerNorm(nn.Module):
    """LayerNorm (with bias) whose two means are linear layers, as in :class:`RMSNorm`.

    ``nn.LayerNorm`` would lower to a ``native_layer_norm`` op; the linears keep every
    format's graph on the same few delegated ops as the RMSNorm models.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("inv_dim", torch.full((1, dim), 1.0 / dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - F.linear(x, self.inv_dim)
        return x * torch.rsqrt(F.linear(x * x, self.inv_dim) + self.eps) * self.weight + self.bias


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """The config's normalization: LayerNorm for GPT-2, RMSNorm otherwise."""
    return LayerNorm(dim, cfg.norm_eps) if cfg.layer_norm else RMSNorm(dim, cfg.norm_eps)


def rotate_half_matrix(head_dim: int, rotary_dim: int | None = None) -> torch.Tensor:
    """P with ``x @ P == cat(-x[..., D/2:], x[..., :D/2])`` (rotate-half as a matmul);
    ``F.linear(x, P.T)`` is the same product. With ``rotary_dim`` R < D only the first R
    dimensions are rotated, ``cat(-x[..., R/2:R], x[..., :R/2])``, and the rest map to 0."""
    r = rotary_dim or head_dim
    h = r // 2
    p = torch.zeros(head_dim, head_dim)
    p[h:r, :h] = -torch.eye(h)
    p[:h, h:r] = torch.eye(h)
    return p


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face weight convention). x: [B, S, H, D]; cos/sin: [S, 1, D];
    rot: ``rotate_half_matrix(D).T`` (a linear layer's weight).

    The rotation is a linear layer with a constant weight instead of split + cat, and
    nothing here reshapes by the sequence length, so the whole projection-and-rotary
    block stays one XNNPACK delegate in prefill graphs too.
    """
    return x * cos + F.linear(x, rot) * sin


class LowRankLinear(nn.Module):
    """A linear layer factored as two plain ``nn.Linear`` in sequence (in -> rank -> out), the
    form low-rank compression gives; every exporter and quantizer sees two ordinary linears."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Linear(in_features, rank, bias=False)
        self.b = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def make_linear(cfg: ModelConfig, name: str, bias: bool) -> nn.Module:
    """The block linear ``name`` (e.g. ``"layers.3.mlp.w_down"``): low-rank if the config says so."""
    n_in, n_out = cfg.linear_shape(name)
    rank = (cfg.low_rank or {}).get(name)
    return LowRankLinear(n_in, n_out, rank, bias) if rank else nn.Linear(n_in, n_out, bias=bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads[layer], cfg.n_kv_heads[layer], cfg.head_dim
        self.rope = not cfg.learned_positions and layer not in (cfg.nope_layers or ())
        self.qk_norm, self.qk_norm_full, self.qk_norm_late = cfg.qk_norm, cfg.qk_norm_full, cfg.qk_norm_after_rope
        if cfg.qk_norm_full:  # OLMo 2: over the whole projection
            self.q_norm = RMSNorm(self.n_heads * self.hd, cfg.norm_eps)
            self.k_norm = RMSNorm(self.n_kv * self.hd, cfg.norm_eps)
        elif cfg.qk_norm:  # Qwen3, Gemma 3: one RMSNorm weight over head_dim, shared by the heads
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        p = f"layers.{layer}.attn."
        self.wq = make_linear(cfg, p + "wq", cfg.qkv_bias)
        self.wk = make_linear(cfg, p + "wk", cfg.qkv_bias)
        self.wv = make_linear(cfg, p + "wv", cfg.qkv_bias)
        self.wo = make_linear(cfg, p + "wo", cfg.o_bias)
        self.max_context = cfg.max_context
        self.window = cfg.window(layer)  # sliding-window layers attend to the last `window` positions
        self.softcap = cfg.attn_softcap  # Gemma 2: scores capped by cap * tanh(score / cap)
        self.impl = "plain"
        self.stateful = self.kv_int8 = False
        # int8 cache: attend over the codes with llama::custom_quantized_sdpa (True), or dequantize the filled
        # rows and use llama::custom_sdpa (False); the pte lowering picks (lowering.executorch.int8_decode_kernel)
        self.int8_sdpa = True

    def init_cache(self, impl: str, kv_cache: str = "fp32") -> None:
        """Allocate the stateful cache buffers for ``impl`` (layout depends on the kernel) holding
        ``kv_cache`` elements (see :data:`KV_CACHE_DTYPES`)."""
        if kv_cache not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown KV cache type {kv_cache!r}; known: {KV_CACHE_DTYPES}")
        if kv_cache == "int8" and impl not in SYMBOLIC_START_IMPLS:
            raise ValueError(f"an int8 KV cache needs one of the attention impls {SYMBOLIC_START_IMPLS}")
        self.impl, self.stateful, self.kv_int8 = impl, True, kv_cache == "int8"
        if impl == "executorch":  # llama::update_cache wants [B, T, H, D]
            shape = (1, self.max_context, self.n_kv, self.hd)
        else:
            shape = (1, self.n_kv, self.max_context, self.hd)
        dtype = torch.int8 if self.kv_int8 else torch.float32
        k_shape = shape
        if impl == "portable":  # no batch axis, keys stored transposed: [KV, D, T] and [KV, T, D] (_attend_portable)
            k_shape, shape = (self.n_kv, self.hd, self.max_context), (self.n_kv, self.max_context, self.hd)
        self.register_buffer("k_cache", torch.zeros(k_shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        if self.kv_int8 and impl == "portable":  # symmetric rows: a scale per row of a head, [KV, 1, T] for K and V
            for name in ("k", "v"):
                self.register_buffer(f"{name}_scales", torch.ones(self.n_kv, 1, self.max_context), persistent=False)
        elif self.kv_int8:  # a scale and a zero point per cached row of a head, [B, T, H, 1]
            rows = (*shape[:-1], 1)
            for name in ("k", "v"):
                self.register_buffer(f"{name}_scales", torch.ones(rows), persistent=False)
                self.register_buffer(f"{name}_zeros", torch.zeros(rows, dtype=torch.int8), persistent=False)

    def _int8_caches(self) -> tuple[torch.Tensor, ...]:
        """The int8 cache's six buffers: K codes, scales, zero points, then V's."""
        return self.k_cache, self.k_scales, self.k_zeros, self.v_cache, self.v_scales, self.v_zeros

    def _qkv(self, x, cos, sin, rot):
        b = x.shape[0]  # -1 for the sequence axis: XNNPACK reshapes with one inferred dim, not a symbolic one
        q, k = self.wq(x), self.wk(x)
        if self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.qk_norm and not self.qk_norm_late:
            q, k = self._head_norms(q, k)
        q = q.view(b, -1, self.n_heads, self.hd)
        k = k.view(b, -1, self.n_kv, self.hd)
        v = self.wv(x).view(b, -1, self.n_kv, self.hd)
        if self.rope:
            q, k = apply_rope(q, cos, sin, rot), apply_rope(k, cos, sin, rot)
        if self.qk_norm_late:  # Hunyuan: the per-head norms come after the rotary embedding
            q, k = self._head_norms(q, k)
            q, k = q.view(b, -1, self.n_heads, self.hd), k.view(b, -1, self.n_kv, self.hd)
        return q, k, v

    def _head_norms(self, q, k):
        """The per-head q/k norms, on [B, S*H, D]: with one KV head, [B, S, 1, D] trips LiteRT's converter."""
        b = q.shape[0]
        return self.q_norm(q.reshape(b, -1, self.hd)), self.k_norm(k.reshape(b, -1, self.hd))

    def _attend(self, q, keys, values, mask, scales=None):
        """Grouped-query attention without repeating the cache.

        q: [B, S, H, D]; keys/values: [B, KV, T, D]; mask: [S, T] additive.
        Query heads of one KV group are folded into the row axis. ``scales``: K's and V's row scales
        [B, KV, T, 1] when keys and values are int8 codes (as floats): they multiply the scores and the
        probabilities (see :meth:`_attend_int8`).
        """
        b, s, h, d = q.shape
        g = h // self.n_kv
        q = q.transpose(1, 2).reshape(b, self.n_kv, g * s, d)
        scale = 1.0 / math.sqrt(d) if scales is None else scales[0].transpose(-1, -2) * (1.0 / math.sqrt(d))
        scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
        scores = soft_cap(scores, self.softcap) + mask.repeat(g, 1)
        p = torch.softmax(scores, dim=-1)
        if scales is not None:
            p = p * scales[1].transpose(-1, -2)  # [B, KV, g*S, T]
        out = torch.matmul(p, values)  # [B, KV, g*S, D]
        return out.view(b, h, s, d).transpose(1, 2).reshape(b, s, h * d)

    def _attend_capped(self, q, keys, values, mask):
        """The executorch layout's attention with soft-capped scores, over the cache's filled rows
        ``[0, n)`` (``mask``: [S, n]). q: [B, S, H, D]; keys/values: those rows, [B, n, KV, D]. Each KV
        head is repeated for its query heads: folding them into the rows as :meth:`_attend` does makes
        torch.export guard on the symbolic length."""
        b, s, h, d = q.shape
        g = h // self.n_kv
        keys = keys.repeat_interleave(g, dim=2).transpose(1, 2)  # [B, H, n, D]
        values = values.repeat_interleave(g, dim=2).transpose(1, 2)
        scores = torch.matmul(q.transpose(1, 2), keys.transpose(-1, -2)) * (1.0 / math.sqrt(d))
        scores = soft_cap(scores, self.softcap) + mask
        out = torch.matmul(torch.softmax(scores, dim=-1), values)  # [B, H, S, D]
        return out.transpose(1, 2).reshape(b, s, h * d)

    def _attend_portable(self, q, k, v, mask, start_pos):
        """Write this call's rows and attend over the filled rows ``[0, n)`` in ATen ops only. ``mask``: [g*S, n],
        the [S, n] mask repeated for the g query heads of a KV group (by ``Decoder.forward``, once for all layers).

        In a .pte the length n comes from an input's shape (``Decoder.length_input``), a symbolic size XNNPACK
        takes, so it runs both matmuls and the softmax; the cache reads and writes (``slice_copy``,
        ``index_put_``) run in ExecuTorch's portable kernels, on one thread, whose transpose (``permute_copy``)
        is slow on large tensors. So nothing cache-sized is transposed, repeated or reshaped: the caches have no
        batch axis (a reshape of a slice of them would make torch.export guard on its length), keys are cached
        transposed ([KV, D, T]) and values as [KV, T, D]; only the new rows, the queries and the output (S
        positions each) are permuted, and the query heads of a KV group are folded into the rows, so each matmul
        is one ``bmm`` over the KV heads.

        An int8 cache (``kv_int8``) holds symmetric rows, as the ONNX graph's (:meth:`_attend_int8`): the new rows
        are quantized first (:func:`quantize_rows_xnnpack`), the scales live in [KV, 1, T] buffers, K's multiply
        the scores and V's the probabilities, and the filled rows' codes are only cast to float, never
        dequantized. Their ``slice_copy`` moves a quarter of an fp32 cache's bytes.
        q: [B, S, H, D]; k, v: [B, S, KV, D] (B is 1). Returns [B, S, H * D].
        """
        b, s, h, d = q.shape
        g = h // self.n_kv
        k, v = k.view(-1, self.n_kv, d), v.view(-1, self.n_kv, d)  # [S, KV, D]
        n = mask.shape[1]
        scale = 1.0 / math.sqrt(d)
        if self.kv_int8:
            (kc, ks), (vc, vs) = quantize_rows_xnnpack(k), quantize_rows_xnnpack(v)  # [S, KV, D], [S, KV, 1]
            k, v = kc, vc
            write_rows(self.k_scales, ks.permute(1, 2, 0), start_pos, axis=2)
            write_rows(self.v_scales, vs.permute(1, 2, 0), start_pos, axis=2)
            scale = self.k_scales.narrow(2, 0, n) * scale  # [KV, 1, n]
        write_rows(self.k_cache, k.permute(1, 2, 0), start_pos, axis=2)
        write_rows(self.v_cache, v.transpose(0, 1), start_pos, axis=1)
        keys_t, values = self.k_cache.narrow(2, 0, n), self.v_cache.narrow(1, 0, n)  # [KV, D, n], [KV, n, D]
        if self.kv_int8:  # ExecuTorch's portable kernel, one thread: as XNNPACK's convert (a dequantize with scale 1)
            # it gave wrong logits once the filled length changed between calls (test_cli checks every position)
            keys_t, values = keys_t.to(q.dtype), values.to(q.dtype)
        # -1 for the sequence axis in every reshape XNNPACK should take (it allows one inferred dim, no symbolic one)
        q = q.view(b, -1, self.n_kv, g, d).permute(0, 2, 3, 1, 4).contiguous().view(self.n_kv, -1, d)  # [KV, g*S, D]
        scores = soft_cap(torch.bmm(q, keys_t) * scale, self.softcap) + mask
        p = torch.softmax(scores, dim=-1)
        if self.kv_int8:
            p = p * self.v_scales.narrow(2, 0, n)
        out = torch.bmm(p, values)  # [KV, g*S, D]
        return out.view(b, self.n_kv, g, -1, d).permute(0, 3, 1, 2, 4).contiguous().view(b, -1, h * d)

    def forward(self, x, cos, sin, rot, pos, mask, start_pos, cache=None):
        q, k, v = self._qkv(x, cos, sin, rot)
        if self.impl == "executorch" and self.kv_int8:
            return self.wo(self._executorch_int8(q, k, v, mask, start_pos).reshape(x.shape[0], -1,
                                                                                  self.n_heads * self.hd)), None
        if self.impl == "executorch":
            torch.ops.llama.update_cache(k, self.k_cache, start_pos)
            torch.ops.llama.update_cache(v, self.v_cache, start_pos)
            if self.softcap:  # custom_sdpa cannot cap scores: attend over the filled rows [0, n) under the mask
                n = mask.shape[1]
                return self.wo(self._attend_capped(q, self.k_cache.narrow(1, 0, n), self.v_cache.narrow(1, 0, n),
                                                   mask)), None
            keys, values = self.k_cache, self.v_cache
            if mask is not None:  # a sliding window: the kernel takes a mask over the filled rows instead
                keys, values = keys.narrow(1, 0, mask.shape[1]), values.narrow(1, 0, mask.shape[1])
            out = custom_sdpa(q, keys, values, start_pos, mask)
            return self.wo(out.reshape(x.shape[0], -1, self.n_heads * self.hd)), None
        if self.impl == "portable":
            return self.wo(self._attend_portable(q, k, v, mask, start_pos)), None
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, KV, S, D]
        if self.kv_int8:  # functional int8 cache (ONNX): K's codes and scales, V's, in; the new rows out
            out, new = self._attend_int8(q, k, v, mask, start_pos, cache)
            return self.wo(out), new
        if self.stateful:
            self.k_cache.index_copy_(2, pos, k)
            self.v_cache.index_copy_(2, pos, v)
            keys, values = self.k_cache, self.v_cache
        elif start_pos is None:
            keys, values = cache[0].index_copy(2, pos, k), cache[1].index_copy(2, pos, v)
        else:  # window: the filled rows [0, start_pos) and the new ones, not the whole cache
            keys = torch.cat((cache[0].narrow(2, 0, start_pos), k), dim=2)
            values = torch.cat((cache[1].narrow(2, 0, start_pos), v), dim=2)
        return self.wo(self._attend(q, keys, values, mask)), (k, v)

    def _attend_int8(self, q, k, v, mask, start_pos, cache):
        """Functional attention over an int8 cache (ONNX's). Each row of a head is int8 codes and an fp32 scale,
        symmetric (:func:`quantize_rows_symmetric`); ``cache`` holds K's codes and scales, then V's, each
        [B, KV, T, ·], and the filled rows ``[0, start_pos)`` are read. The new rows are quantized first and
        attended like the cached ones, so a token's output does not depend on how its rows arrived (one prefill,
        several chunks, a speculative check). Returns (output [B, S, H * D], the four new-row tensors).

        The rows are not dequantized. A row's scale is one number, so K's scales join the scores' ``1/sqrt(D)``
        and V's multiply the probabilities; the only pass over the cache is the codes' cast to float.
        Dequantizing first (and ExecuTorch's asymmetric rows: a zero point to subtract) made a decode step at
        3300 tokens of SmolLM2 ~23 ms slower than with an fp32 cache, against ~2 ms this way (see the README)."""
        if start_pos is None:
            raise ValueError("an int8 functional cache needs window_attention (it reads the filled rows only)")
        new = (*quantize_rows_symmetric(k), *quantize_rows_symmetric(v))
        kc, ks, vc, vs = (torch.cat((c.narrow(2, 0, start_pos), r), dim=2) for c, r in zip(cache, new))
        return self._attend(q, kc.to(q.dtype), vc.to(q.dtype), mask, (ks, vs)), new

    def _executorch_int8(self, q, k, v, mask, start_pos):
        """Attention over an int8 cache, as ExecuTorch's own ``QuantizedKVCache`` and ``QuantizedSDPA`` do it:
        the new K/V rows are quantized per position and head (asymmetric, 8 bits) and written with their scales
        and zero points. With ``int8_sdpa`` the query is quantized the same way and
        ``llama::custom_quantized_sdpa`` attends over the codes; without it the filled rows are dequantized for
        ``llama::custom_sdpa``. Returns [B, S, H, D]."""
        caches = self._int8_caches()
        for new, cache in zip((*quantize_rows(k), *quantize_rows(v)), caches, strict=True):
            torch.ops.llama.update_cache(new, cache, start_pos)
        if mask is not None or not self.int8_sdpa:  # the filled rows [0, n): under the mask, or all of them
            n = start_pos + q.shape[1] if mask is None else mask.shape[1]
            caches = tuple(c.narrow(1, 0, n) for c in caches)
        if self.softcap or not self.int8_sdpa:  # dequantized: capped scores here, or the fp32 kernel
            keys, values = dequantize_rows(*caches[:3]), dequantize_rows(*caches[3:])
            if self.softcap:  # the kernel cannot cap scores
                return self._attend_capped(q, keys, values, mask).view(q.shape)
            return custom_sdpa(q, keys, values, start_pos, mask)
        kc, ks, kz, vc, vs, vz = caches
        qc, qs, qz = quantize_rows(q)
        if mask is None:  # causal over [0, start_pos + S)
            return torch.ops.llama.custom_quantized_sdpa(qc, kc, vc, start_pos, None, 0, True, None,
                                                         qz, qs, kz, ks, vz, vs)
        return torch.ops.llama.custom_quantized_sdpa(qc, kc, vc, 0, mask, 0, False, None, qz, qs, kz, ks, vz, vs)


def custom_sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start_pos, mask) -> torch.Tensor:
    """ExecuTorch's ``llama::custom_sdpa`` over keys/values [B, n, KV, D]: causal over [0, start_pos + S) when
    ``mask`` is None, else under ``mask`` [S, n] (which then says everything, so the kernel's start is 0)."""
    if mask is None:
        return torch.ops.llama.custom_sdpa(q, keys, values, start_pos, None, 0, True)
    return torch.ops.llama.custom_sdpa(q, keys, values, 0, mask, 0, False)


def write_rows(cache: torch.Tensor, rows: torch.Tensor, start_pos, axis: int) -> None:
    """Write ``rows`` into ``cache`` at positions ``start_pos ..`` along ``axis`` (its S positions on the same
    axis), as one ``index_put_``: what ``llama::update_cache`` does, in an ATen op that ExecuTorch's portable
    kernel runs in place once its reinplace pass has run (a slice assignment would become a ``slice_scatter``,
    a copy of the whole cache). That kernel's in-place case takes one index tensor: the other axes get None."""
    idx = start_pos + torch.arange(rows.shape[axis], dtype=torch.long)
    torch.ops.aten.index_put_.default(cache, [None] * axis + [idx], rows)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 codes of ``x`` [..., D], with an fp32 scale and an int8 zero point per row [..., 1] (asymmetric:
    each row's min and max map to -128 and 127)."""
    scales, zeros = torch.ops.quantized_decomposed.choose_qparams_per_token_asymmetric.default(x, torch.int8)
    codes = torch.ops.quantized_decomposed.quantize_per_token(x, scales, zeros, -128, 127, torch.int8)
    return codes, scales.to(torch.float32), zeros.to(torch.int8)


def quantize_rows_symmetric(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of ``x`` [..., D] in -127..127 and an fp32 scale per row [..., 1], symmetric (no zero point:
    llama.cpp's Q8_0 with one block per row), in plain ops: the ONNX int8 cache (:meth:`Attention._attend_int8`)."""
    scales = torch.clamp(x.abs().amax(dim=-1, keepdim=True) * (1.0 / 127.0), min=torch.finfo(torch.float32).eps)
    return torch.clamp(torch.round(x * (1.0 / scales)), -127.0, 127.0).to(torch.int8), scales


def quantize_rows_xnnpack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows_symmetric` for the portable .pte's new rows x [S, KV, D], in ops XNNPACK takes up to the
    final cast: a 4-D ``max`` over the last axis (XNNPACK takes no ``amax``) and ``floor(y + 0.5)`` (it takes no
    ``round``; ties round up, not to even). With ``amax`` and ``round`` left to ExecuTorch's portable kernels
    between XNNPACK's ops, its partitioner built a partition with a dependency cycle and the export failed."""
    _, kv, d = x.shape
    x4 = x.view(1, -1, kv, d)
    scales = torch.clamp(x4.abs().max(dim=3, keepdim=True).values * (1.0 / 127.0), min=torch.finfo(torch.float32).eps)
    codes = torch.clamp(torch.floor(x4 / scales + 0.5), -127.0, 127.0).to(torch.int8)
    return codes.view(-1, kv, d), scales.view(-1, kv, 1)


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The fp32 rows that :func:`quantize_rows` coded."""
    return (codes.to(torch.float32) - zeros.to(torch.float32)) * scales


class ShortConv(nn.Module):
    """LFM2's gated short convolution, the token mixer of a convolution layer (``ModelConfig.conv_layers``):
    ``wo(C * conv(B * X))``, where ``w_in`` gives B, C and X and ``conv`` is causal and depthwise, ``conv_kernel``
    taps over the positions. Its cache holds B * X per position (first half in the K cache, second in the V
    cache, shaped like the attention caches), so it is written, exported and rewound as keys and values are;
    a call reads the ``conv_kernel - 1`` rows before its first position. Same signature as :class:`Attention`.
    """

    window = None  # no attention mask to pick
    rope = qk_norm = softcap = False

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.dim, self.taps = cfg.dim, cfg.conv_kernel
        self.n_kv, self.hd, self.max_context = cfg.n_kv_heads[layer], cfg.head_dim, cfg.max_context
        p = f"layers.{layer}.attn."
        self.w_in = make_linear(cfg, p + "w_in", cfg.conv_bias)
        self.conv_weight = nn.Parameter(torch.zeros(cfg.dim, self.taps))  # [channel, tap]; the last tap is "now"
        self.conv_bias = nn.Parameter(torch.zeros(cfg.dim)) if cfg.conv_bias else None
        self.wo = make_linear(cfg, p + "wo", cfg.conv_bias)
        self.impl = "plain"
        self.stateful = False

    def init_cache(self, impl: str, kv_cache: str = "fp32") -> None:
        """The convolution's rows stay fp32 whatever ``kv_cache`` says: they feed a sum, not a softmax. A
        portable .pte keeps them in the plain layout [B, KV, T, D] (no transposed keys: nothing attends)."""
        Attention.init_cache(self, "plain" if impl == "portable" else impl)
        self.impl = impl

    def gate_and_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """C and B * X of ``x`` [B, S, dim]: the output gate and what is cached and convolved."""
        b_gate, c_gate, values = self.w_in(x).chunk(3, dim=-1)
        return c_gate, b_gate * values

    def earlier(self, k_cache: torch.Tensor, v_cache: torch.Tensor, start, axis: int) -> torch.Tensor:
        """The cached B * X of the ``taps - 1`` positions before ``start``, [B, taps - 1, dim], zero before
        position 0. The caches hold positions along ``axis`` ([B, KV, T, D]: 2; ExecuTorch's [B, T, KV, D]: 1)."""
        idx = torch.arange(1 - self.taps, 0) + start
        rows = [c.index_select(axis, idx.clamp(min=0)) for c in (k_cache, v_cache)]
        if axis == 2:
            rows = [r.transpose(1, 2) for r in rows]
        b = k_cache.shape[0]
        prev = torch.cat([r.reshape(b, self.taps - 1, -1) for r in rows], dim=-1)
        return prev * (idx >= 0).to(prev.dtype)[None, :, None]

    def mix(self, c_gate: torch.Tensor, prev: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The layer's output from the gate, the earlier rows and this call's B * X ([B, S, dim])."""
        seq = torch.cat((prev, rows), dim=1)  # [B, taps - 1 + S, dim]
        s = rows.shape[1]
        out = seq.narrow(1, 0, s) * self.conv_weight[:, 0]
        for tap in range(1, self.taps):
            out = out + seq.narrow(1, tap, s) * self.conv_weight[:, tap]
        if self.conv_bias is not None:
            out = out + self.conv_bias
        return self.wo(c_gate * out)

    def halves(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B * X as cache rows: its first and second half, each [B, S, KV, D]."""
        b = rows.shape[0]
        k, v = rows.chunk(2, dim=-1)
        return k.reshape(b, -1, self.n_kv, self.hd), v.reshape(b, -1, self.n_kv, self.hd)

    def forward(self, x, cos, sin, rot, pos, mask, start_pos, cache=None):
        c_gate, rows = self.gate_and_rows(x)
        k, v = self.halves(rows)
        if self.impl == "executorch":
            prev = self.earlier(self.k_cache, self.v_cache, start_pos, 1)  # rows before start_pos: not written here
            torch.ops.llama.update_cache(k, self.k_cache, start_pos)
            torch.ops.llama.update_cache(v, self.v_cache, start_pos)
            return self.mix(c_gate, prev, rows), None
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, KV, S, D]
        start = pos[0] if start_pos is None else start_pos
        if self.impl == "portable":  # the plain layout, written as in Attention._attend_portable
            prev = self.earlier(self.k_cache, self.v_cache, start, 2)
            write_rows(self.k_cache, k, start, axis=2)
            write_rows(self.v_cache, v, start, axis=2)
        elif self.stateful:
            prev = self.earlier(self.k_cache, self.v_cache, start, 2)
            self.k_cache.index_copy_(2, pos, k)
            self.v_cache.index_copy_(2, pos, v)
        elif cache[0].shape[2] == 0:  # an empty functional cache (compression's calibration): nothing before
            prev = rows.new_zeros(rows.shape[0], self.taps - 1, self.dim)
        else:
            prev = self.earlier(cache[0], cache[1], start, 2)
        return self.mix(c_gate, prev, rows), (k, v)


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's attention scores and logits); ``x`` itself when ``cap`` is None."""
    return torch.tanh(x * (1.0 / cap)) * cap if cap else x


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU (GPT-2's "gelu_new", Gemma's "gelu_pytorch_tanh"), written out: ExecuTorch's
    XNNPACK delegate lowers ``gelu(approximate="tanh")`` to its exact (erf) GELU, 1e-3 off in the logits."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        p = f"layers.{layer}.mlp."
        self.gated = cfg.gated_mlp
        self.act = {"silu": F.silu, "gelu_tanh": gelu_tanh, "gelu": F.gelu, "relu": F.relu}[cfg.mlp_activation]
        if self.gated:
            self.w_gate = make_linear(cfg, p + "w_gate", cfg.mlp_bias)
        self.w_up = make_linear(cfg, p + "w_up", cfg.mlp_bias)
        self.w_down = make_linear(cfg, p + "w_down", cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU / GeGLU ``w_down(act(w_gate x) * w_up x)``, or GPT-2's ``w_down(act(w_up x))``."""
        if self.gated:
            return self.w_down(self.act(self.w_gate(x)) * self.w_up(x))
        return self.w_down(self.act(self.w_up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = nn.Identity() if cfg.post_norm else make_norm(cfg, cfg.dim)
        self.attn = ShortConv(cfg, layer) if cfg.is_conv(layer) else Attention(cfg, layer)
        self.mlp_norm = nn.Identity() if cfg.shared_norm or cfg.post_norm else make_norm(cfg, cfg.dim)
        self.mlp = MLP(cfg, layer)
        # Gemma also normalizes each branch's output before the residual add; OLMo 2 does only that
        post = cfg.sandwich_norm or cfg.post_norm
        self.attn_post_norm = make_norm(cfg, cfg.dim) if post else nn.Identity()
        self.mlp_post_norm = make_norm(cfg, cfg.dim) if post else nn.Identity()
        self.local_rope = cfg.local_rope(layer)
        self.parallel, self.shared_norm = cfg.parallel_residual, cfg.shared_norm

    def forward(self, x, cos, sin, rot, pos, mask, start_pos, cache=None):
        h = self.attn_norm(x)
        a, new_kv = self.attn(h, cos, sin, rot, pos, mask, start_pos, cache)
        return self.residual(x, h, a), new_kv

    def residual(self, x: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The block's output from its input ``x``, the normed input ``h`` and the attention's output ``a``:
        the MLP reads the attention's result, or (parallel) the block's input, through ``h`` if shared."""
        if self.parallel:
            return x + a + self.mlp(h if self.shared_norm else self.mlp_norm(x))
        x = x + self.attn_post_norm(a)
        return x + self.mlp_post_norm(self.mlp(self.mlp_norm(x)))


def attention_mask(pos: torch.Tensor, t: int, window: int | None = None) -> torch.Tensor:
    """Additive ``[S, t]`` mask of the queries at positions ``pos`` ([S]) over cache rows ``[0, t)``:
    causal, and with ``window`` only the last ``window`` positions (the query's own included)."""
    rows = torch.arange(t, dtype=pos.dtype)[None, :]
    allowed = rows <= pos[:, None]
    if window is not None:
        allowed = allowed & (rows > pos[:, None] - window)
    return torch.where(allowed, 0.0, float("-inf"))


class Decoder(nn.Module):
    """Decoder-only transformer with a static KV cache.

    ``forward(tokens[1, S], input_pos[1])`` runs S tokens starting at position
    ``input_pos[0]`` and returns logits of the last position ``[1, vocab]`` (or of
    every position with ``full_logits=True``). With ``length_input`` (a .pte's impls),
    ``input_pos`` is ``arange(start + S)`` instead, of which only the length is read.
    In functional mode pass ``caches`` (a list of (K, V) per layer, each [1, KV, T, D])
    and get ``(logits, new_rows)`` back, where ``new_rows`` holds each layer's K and V
    for the S new positions;
    ``logits_to_keep`` (int64 ``[n]``, indices into the S positions) then picks whose
    logits come back, ``[1, n, vocab]``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # GPT-2: a learned embedding per position (only the first max_context rows are kept)
        self.pos_embeddings = nn.Embedding(cfg.max_context, cfg.dim) if cfg.learned_positions else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.dim)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=cfg.output_bias)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if cfg.learned_positions:
            cos = sin = rot = None
        else:
            cos, sin = rope_tables(cfg)
            rot = rotate_half_matrix(cfg.head_dim, cfg.rotary_dim).T.contiguous()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("rope_rot", rot, persistent=False)
        local = None, None  # Gemma 3's sliding-window layers: their own base, no scaling
        if cfg.local_rope_theta:
            local = rope_tables(dataclasses.replace(cfg, rope_theta=cfg.local_rope_theta, rope_scaling=None))
        self.register_buffer("rope_cos_local", local[0], persistent=False)
        self.register_buffer("rope_sin_local", local[1], persistent=False)
        self.full_logits = False
        # functional mode only: attend to cache rows [0, start_pos) plus the new rows instead of all
        # max_context (a data-dependent shape: for dynamic-shape exporters such as ONNX, not TFLite)
        self.window_attention = False
        self.impl = "plain"
        self.stateful = False
        # a .pte's impls: input_pos has shape [start_pos + S] (the positions in use after the call; only its length
        # is read) instead of holding [start_pos]. A start read from a tensor is an unbacked symbolic integer, and
        # XNNPACK delegates no op whose shape depends on one; an input's length is a backed one, with an upper bound.
        self.length_input = False

    def make_stateful(self, impl: str = "plain", kv_cache: str = "fp32") -> Decoder:
        """Give every layer an in-place KV cache; ``impl`` picks the attention kernel, ``kv_cache`` the
        attention layers' cache elements (``int8``: a .pte's impls, executorch and portable)."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention impl {impl!r}; known: {ATTENTION_IMPLS}")
        if impl == "executorch":
            from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  registers llama:: ops
        if kv_cache == "int8":
            from torch.ao.quantization.fx._decomposed import quantized_decomposed_lib  # noqa: F401  per-token ops
        self.impl, self.stateful = impl, True
        for block in self.layers:
            block.attn.init_cache(impl, kv_cache)
        return self

    def functional_cache(self, kv_cache: str = "fp32") -> Decoder:
        """Set the element type of the attention layers' functional caches (``int8``: codes and a scale per row,
        symmetric; needs ``window_attention``). :meth:`empty_caches` then makes caches of that type."""
        if kv_cache not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown KV cache type {kv_cache!r}; known: {KV_CACHE_DTYPES}")
        for block in self.layers:
            if isinstance(block.attn, Attention):
                block.attn.kv_int8 = kv_cache == "int8"
        return self

    def reset_cache(self) -> None:
        for block in self.layers:
            block.attn.k_cache.zero_()
            block.attn.v_cache.zero_()

    def cache_kinds(self) -> list[str]:
        """Each layer's functional cache type: ``int8`` for an attention layer given one by
        :meth:`functional_cache`, else ``fp32`` (an LFM2 convolution layer's cache stays fp32)."""
        return ["int8" if isinstance(block.attn, Attention) and block.attn.kv_int8 else "fp32" for block in self.layers]

    def empty_caches(self) -> list[tuple[torch.Tensor, ...]]:
        """Zeroed functional caches, one (K, V) pair per layer, [1, KV, T, D]; for a layer with an int8 cache
        (:meth:`functional_cache`) four tensors: K's codes and scales [1, KV, T, 1], then V's."""
        out = []
        for i, kind in enumerate(self.cache_kinds()):
            shape = self.cfg.kv_cache_shape(i)
            if kind == "int8":
                rows = (*shape[:-1], 1)
                out.append((torch.zeros(shape, dtype=torch.int8), torch.ones(rows),
                            torch.zeros(shape, dtype=torch.int8), torch.ones(rows)))
            else:
                out.append((torch.zeros(shape), torch.zeros(shape)))
        return out

    def _rotary(self, start_pos, pos, s: int) -> list[tuple[torch.Tensor, torch.Tensor] | tuple[None, None]]:
        """(cos, sin) rows of this call's positions, [S, 1, D]: the global table's, then the local one's."""
        out = []
        for cos, sin in ((self.rope_cos, self.rope_sin), (self.rope_cos_local, self.rope_sin_local)):
            if cos is None:
                out.append((None, None))
            elif pos is None:  # the executorch path: a symbolic start position
                out.append((cos.narrow(0, start_pos, s).unsqueeze(1), sin.narrow(0, start_pos, s).unsqueeze(1)))
            else:
                out.append((cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)))
        return out

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (scaled for Gemma), plus GPT-2's learned position embeddings."""
        x = self.tok_embeddings(tokens)
        if self.cfg.embedding_scale != 1.0:
            x = x * self.cfg.embedding_scale
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(positions)
        return x

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, caches=None,
                logits_to_keep: torch.Tensor | None = None):
        s = tokens.shape[1]
        t = self.cfg.max_context
        window = self.cfg.sliding_window
        if self.impl in SYMBOLIC_START_IMPLS:
            if self.length_input:
                start_pos = input_pos.shape[0] - s  # a size: a symbolic integer XNNPACK takes (see length_input)
            else:
                start_pos = input_pos[0].item()
                torch._check(start_pos + s <= t)
            torch._check(start_pos >= 0)
            rotary = self._rotary(start_pos, None, s)
            pos = mask = None  # custom_sdpa is causal by itself
            if self.cfg.attn_softcap or self.impl == "portable":  # attention in plain ops: a mask over the filled rows
                mask = attention_mask(start_pos + torch.arange(s), start_pos + s)
            # sliding-window layers: a mask over the filled rows only (over all T, decode ran 2.5x slower)
            local_mask = None if window is None else attention_mask(start_pos + torch.arange(s), start_pos + s, window)
        else:
            start_pos = None
            pos = input_pos[0] + torch.arange(s, dtype=torch.long)
            rotary = self._rotary(None, pos, s)
            if self.window_attention and caches is not None:  # attend to the filled rows only
                start_pos = input_pos[0].item()
                torch._check(start_pos >= 0)
                torch._check(start_pos + s <= t)
                t = start_pos + s
            mask = attention_mask(pos, t)
            local_mask = None if window is None else attention_mask(pos, t, window)
        positions = None
        if self.pos_embeddings is not None:
            positions = start_pos + torch.arange(s, dtype=torch.long) if pos is None else pos
        x = self.embed(tokens, positions)
        new_rows = []
        grouped = {}  # portable: a mask's rows repeated for the query heads of a KV group, once per forward
        for i, block in enumerate(self.layers):
            cos, sin = rotary[block.local_rope]
            m = mask if block.attn.window is None else local_mask
            if self.impl == "portable" and isinstance(block.attn, Attention):
                key = (block.attn.window, block.attn.n_heads // block.attn.n_kv)
                if key not in grouped:
                    grouped[key] = m.repeat(key[1], 1)
                m = grouped[key]
            x, kv = block(x, cos, sin, self.rope_rot, pos, m, start_pos, None if caches is None else caches[i])
            new_rows.append(kv)
        last = logits_to_keep is None and not self.full_logits
        if logits_to_keep is not None:  # the positions asked for, [1, n, vocab] (HF's tensor logits_to_keep)
            x = x.index_select(1, logits_to_keep)
        elif last:
            x = x[:, -1:, :]
        logits = self.head(x)
        logits = logits[:, -1, :] if last else logits
        return logits if caches is None else (logits, new_rows)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states ``x``: the final norm, the LM head and (Gemma 2) the logits' soft cap."""
        return soft_cap(self.output(self.norm(x)), self.cfg.final_softcap)


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig,
                       hf_config: object | None = None) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face state dict (of a ``model_type`` that ``sources.config_from_hf`` takes) to the
    canonical names, folding what the canonical decoder does not compute into the weights (Gemma's and
    Granite's scales, interleaved RoPE): pass the model's ``hf_config``, which says what to fold."""
    if cfg.arch == "gpt2":
        return _state_dict_from_gpt2(sd, cfg)
    if cfg.arch == "opt":
        return _state_dict_from_opt(sd, cfg)
    if cfg.arch == "gpt_neox":
        return _state_dict_from_gpt_neox(sd, cfg)
    names = {
        "self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
        "self_attn.o_proj": "attn.wo", "mlp.gate_proj": "mlp.w_gate", "mlp.up_proj": "mlp.w_up",
        "mlp.down_proj": "mlp.w_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
        "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm",
        "self_attn.query_layernorm": "attn.q_norm", "self_attn.key_layernorm": "attn.k_norm",  # Hunyuan
        "self_attn.dense": "attn.wo", "mlp.fc1": "mlp.w_up", "mlp.fc2": "mlp.w_down",  # Phi
        # LFM2: its attention's and convolution's output projections, q/k norms, SwiGLU and norms
        "self_attn.out_proj": "attn.wo", "self_attn.q_layernorm": "attn.q_norm", "self_attn.k_layernorm": "attn.k_norm",
        "conv.in_proj": "attn.w_in", "conv.out_proj": "attn.wo", "feed_forward.w1": "mlp.w_gate",
        "feed_forward.w3": "mlp.w_up", "feed_forward.w2": "mlp.w_down", "operator_norm": "attn_norm",
        "ffn_norm": "mlp_norm",
    }
    if cfg.sandwich_norm or cfg.post_norm:  # Gemma, OLMo 2: "post_attention" is the attention output's own norm
        names.update({"post_attention_layernorm": "attn_post_norm", "pre_feedforward_layernorm": "mlp_norm",
                      "post_feedforward_layernorm": "mlp_post_norm"})

    def fused(i: int, mod: str, param: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if mod == "self_attn.qkv_proj":  # Phi-3: q, k and v rows in one matrix
            q, kv = cfg.n_heads[i] * cfg.head_dim, cfg.n_kv_heads[i] * cfg.head_dim
            return {f"attn.{name}.{param}": part.clone() for name, part in zip(("wq", "wk", "wv"),
                                                                                value.split([q, kv, kv]))}
        if mod == "mlp.gate_up_proj":  # Phi-3: gate rows, then up rows
            return {f"mlp.{name}.{param}": part.clone() for name, part in zip(("w_gate", "w_up"),
                                                                               value.split(cfg.ffn_dim[i]))}
        if mod == "conv.conv":  # LFM2: a depthwise Conv1d, weight [dim, 1, taps]
            return {f"attn.conv_{param}": value.reshape(cfg.dim, -1).squeeze(-1).clone()}  # bias: [dim]
        return None

    top = {"embed_tokens": "tok_embeddings", "norm": "norm", "final_layernorm": "norm",  # Phi: final_layernorm
           "embedding_norm": "norm", "lm_head": "output"}  # LFM2's final norm is its "embedding_norm"
    # anything else (e.g. rotary_emb.inv_freq) is recomputed from the config
    out = _rename(sd, cfg, "model.", "layers", top, names, fused)
    if cfg.arch in ("gemma", "gemma2", "gemma3"):
        _fold_gemma(out, cfg, hf_config)
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "granite":
        _fold_granite(out, cfg, hf_config)
    if model_type in INTERLEAVED_ROPE:
        _deinterleave_rope(out, cfg)
    return out


#: ``model_type``s whose rotary embedding rotates adjacent pairs (2j, 2j+1) of a head, not (j, j + d/2)
INTERLEAVED_ROPE = ("helium", "ernie4_5", "glm")


def _deinterleave_rope(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Reorder the query and key rows of each head so that interleaved pairs land where the canonical
    (split-half) rotary embedding expects them: rotated dimension 2j goes to j, 2j+1 to j + r/2. Queries
    and keys move alike, so their dot products, and the model, are unchanged."""
    r = cfg.rotary_dim or cfg.head_dim
    within = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2), torch.arange(r, cfg.head_dim)])
    for i in range(cfg.n_layers):
        for name, heads in (("wq", cfg.n_heads[i]), ("wk", cfg.n_kv_heads[i])):
            rows = (torch.arange(heads)[:, None] * cfg.head_dim + within).reshape(-1)
            for param in ("weight", "bias"):
                key = f"layers.{i}.attn.{name}.{param}"
                if key in sd:
                    sd[key] = sd[key][rows].clone()


def _fold_granite(sd: dict[str, torch.Tensor], cfg: ModelConfig, hf_config: object) -> None:
    """Granite scales the embedding, the attention scores, each block's output and the logits by
    constants of its config: each goes into a weight. The scores' ``attention_multiplier`` replaces
    ``head_dim ** -0.5`` (into the query projection; RoPE is linear), the logits' ``1 / logits_scaling``
    goes into the final norm (and so does ``1 / embedding_multiplier`` when the LM head is the scaled
    embedding)."""
    emb, res = float(hf_config.embedding_multiplier), float(hf_config.residual_multiplier)
    q_scale = float(hf_config.attention_multiplier) * math.sqrt(cfg.head_dim)
    norm_scale = 1.0 / float(hf_config.logits_scaling) / (emb if cfg.tie_embeddings else 1.0)
    sd["tok_embeddings.weight"] = sd["tok_embeddings.weight"] * emb
    sd["norm.weight"] = sd["norm.weight"] * norm_scale
    for key in list(sd):
        if key.endswith(("attn.wq.weight", "attn.wq.bias")):
            sd[key] = sd[key] * q_scale
        elif key.endswith(("attn.wo.weight", "attn.wo.bias", "mlp.w_down.weight", "mlp.w_down.bias")):
            sd[key] = sd[key] * res


def _fold_gemma(sd: dict[str, torch.Tensor], cfg: ModelConfig, hf_config: object | None) -> None:
    """Gemma's RMSNorm multiplies by ``1 + weight``: store ``1 + weight``. Gemma 2 and 3 scale scores
    by ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5``: the ratio goes into the query norm
    (Gemma 3) or the query projection (Gemma 2; RoPE is linear), so every exporter's attention keeps
    its usual scale."""
    if hf_config is None:
        raise ValueError("Gemma weights need the model's config (query_pre_attn_scalar) to convert")
    scalar = getattr(hf_config, "query_pre_attn_scalar", None) or cfg.head_dim  # Gemma 1: head_dim
    q_scale = math.sqrt(cfg.head_dim / float(scalar))
    for key in list(sd):
        if key.endswith("norm.weight"):
            sd[key] = 1.0 + sd[key]
        if key.endswith("attn.q_norm.weight" if cfg.qk_norm else ("attn.wq.weight", "attn.wq.bias")):
            sd[key] = sd[key] * q_scale


def _rename(sd: dict[str, torch.Tensor], cfg: ModelConfig, prefix: str, blocks: str, top: dict[str, str],
            names: dict[str, str], fused=None) -> dict[str, torch.Tensor]:
    """Canonical names for a state dict whose keys start with ``prefix`` (the LM head's may not): ``top``
    renames the modules outside the blocks (embeddings, the final norm, the LM head), ``names`` the modules
    of block ``i`` (``<blocks>.<i>.<module>.<param>``). ``fused(i, module, param, value)`` gives the
    canonical entries (names within the block) of a module that is more than renamed, or None."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = key.removeprefix(prefix)
        mod, _, param = k.rpartition(".")
        if mod in top:
            out[f"{top[mod]}.{param}"] = value
        elif k.startswith(blocks + "."):
            idx, rest = k[len(blocks) + 1:].split(".", 1)
            mod, param = rest.rsplit(".", 1)
            parts = fused(int(idx), mod, param, value) if fused else None
            if parts is None and mod in names:
                parts = {f"{names[mod]}.{param}": value}
            out.update({f"layers.{idx}.{name}": v for name, v in (parts or {}).items()})
    if cfg.tie_embeddings:
        out.pop("output.weight", None)
    return out


def _state_dict_from_gpt2(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2's names, fused q/k/v and ``Conv1D`` weights ([in, out], the transpose of a linear's). Every
    trained position is kept: build_decoder keeps the first max_context."""
    conv = {"attn.c_proj": "attn.wo", "mlp.c_fc": "mlp.w_up", "mlp.c_proj": "mlp.w_down"}

    def fused(i: int, mod: str, param: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
        def linear(x: torch.Tensor) -> torch.Tensor:
            return x.T.contiguous() if param == "weight" else x.clone()

        if mod == "attn.c_attn":  # [d, 3d] weight, [3d] bias: q, k, v side by side
            return {f"attn.{name}.{param}": linear(part)
                    for name, part in zip(("wq", "wk", "wv"), value.split(cfg.dim, dim=-1))}
        return {f"{conv[mod]}.{param}": linear(value)} if mod in conv else None

    return _rename(sd, cfg, "transformer.", "h", {"wte": "tok_embeddings", "wpe": "pos_embeddings", "ln_f": "norm",
                                                 "lm_head": "output"},
                   {"ln_1": "attn_norm", "ln_2": "mlp_norm"}, fused)


def _state_dict_from_opt(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """OPT's names. Its position table starts 2 rows in (``OPTLearnedPositionalEmbedding.offset``)."""
    names = {"self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
             "self_attn.out_proj": "attn.wo", "fc1": "mlp.w_up", "fc2": "mlp.w_down",
             "self_attn_layer_norm": "attn_norm", "final_layer_norm": "mlp_norm"}
    out = _rename(sd, cfg, "model.decoder.", "layers", {"embed_tokens": "tok_embeddings",
                                                        "embed_positions": "pos_embeddings",
                                                        "final_layer_norm": "norm", "lm_head": "output"}, names)
    out["pos_embeddings.weight"] = out["pos_embeddings.weight"][2:]
    return out


def _state_dict_from_gpt_neox(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-NeoX's names; its fused ``query_key_value`` holds each head's q, k and v rows in turn."""
    names = {"attention.dense": "attn.wo", "mlp.dense_h_to_4h": "mlp.w_up", "mlp.dense_4h_to_h": "mlp.w_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}

    def fused(i: int, mod: str, param: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if mod != "attention.query_key_value":
            return None
        heads = value.reshape(cfg.n_heads[i], 3, cfg.head_dim, *value.shape[1:])  # -> q, k, v of [H * D, ...]
        return {f"attn.{name}.{param}": heads[:, j].reshape(-1, *value.shape[1:]).clone()
                for j, name in enumerate(("wq", "wk", "wv"))}

    top = {"embed_in": "tok_embeddings", "final_layer_norm": "norm",
           "embed_out": "output", "lm_head": "output"}  # transformers 5 calls embed_out lm_head
    return _rename(sd, cfg, "gpt_neox.", "layers", top, names, fused)


def build_decoder(cfg: ModelConfig, state_dict: dict[str, torch.Tensor] | None = None) -> Decoder:
    """A :class:`Decoder` in eval mode, with ``state_dict`` (canonical names) loaded strictly."""
    model = Decoder(cfg)
    if state_dict is not None:
        sd = dict(state_dict)
        if cfg.tie_embeddings:
            sd.pop("output.weight", None)
            sd["output.weight"] = sd["tok_embeddings.weight"]
        if cfg.learned_positions and "pos_embeddings.weight" in sd:
            rows = sd["pos_embeddings.weight"]
            if rows.shape[0] < cfg.max_context:
                raise ValueError(f"the model has learned positions for {rows.shape[0]} tokens, "
                                 f"fewer than max_context {cfg.max_context}")
            sd["pos_embeddings.weight"] = rows[: cfg.max_context]
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
