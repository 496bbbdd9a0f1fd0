"""Quantization schemes, named once for every format.

=============  ==========================================================  ==============================
scheme         meaning                                                     formats
=============  ==========================================================  ==============================
fp32           no quantization                                             pte, onnx, tflite
w8             int8 weights per output channel, float activations          onnx, tflite
w8a8           int8 weights per channel, int8 activations (dynamic)        pte, onnx, tflite
w8a8-static    int8 weights and activations, calibrated ranges             onnx
w4a8           int4 weights in groups of ``group_size``, dynamic int8 act  pte, onnx, tflite
               (pte and onnx: a float minimum per group, GGUF Q4_1's form;
               tflite: symmetric groups)
=============  ==========================================================  ==============================

Each lowering maps a scheme to its format's own tool (torchao + XNNPACK for ExecuTorch,
ai-edge-quantizer for LiteRT, onnxruntime.quantization for ONNX) and declares which
schemes it can do; asking for another is a :class:`FormatError` that names them. What was
really quantized is counted and reported: a layer silently left in float (e.g. a group
size that does not divide ``in_features``) is a known trap.

The embedding and the LM head are choices the user sees: ``embedding`` is ``int8``
(per row) or ``fp32``; ``lm_head`` is ``int8`` (per channel, the default: it is the
largest matmul of a small model and int4 hurts it most), ``scheme`` (same as the other
linears) or ``fp32``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgelm.errors import ConversionError, FormatError

SCHEMES = ("fp32", "w8", "w8a8", "w8a8-static", "w4a8")
EMBEDDING_CHOICES = ("int8", "fp32")
LM_HEAD_CHOICES = ("int8", "scheme", "fp32")


@dataclass
class QuantSpec:
    """A quantization request: scheme plus the knobs a user may change."""

    scheme: str = "fp32"
    group_size: int = 32
    embedding: str = "int8"
    lm_head: str = "int8"
    # w4a8: symmetric int4 groups (GGUF Q4_0's form) instead of groups with a float minimum
    # (Q4_1's form). Faster in ExecuTorch (no block-sum matmuls); LiteRT is always symmetric.
    int4_symmetric: bool = False
    # SmoothQuant migration strength (0: off); pte and tflite, see smooth_activations
    smooth: float = 0.0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise FormatError(f"unknown quantization scheme {self.scheme!r}; choose one of: {', '.join(SCHEMES)}")
        if self.embedding not in EMBEDDING_CHOICES:
            raise FormatError(f"embedding must be one of {EMBEDDING_CHOICES}, got {self.embedding!r}")
        if self.lm_head not in LM_HEAD_CHOICES:
            raise FormatError(f"lm_head must be one of {LM_HEAD_CHOICES}, got {self.lm_head!r}")
        if not 0.0 <= self.smooth <= 1.0:
            raise FormatError(f"smooth (SmoothQuant's alpha) must be between 0 and 1, got {self.smooth}")
        if self.smooth and not self.quantized:
            raise FormatError("smoothing only matters for quantized schemes (w8a8, w4a8); drop --smooth for fp32")
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise FormatError(f"group size must be a power of two >= 16, got {self.group_size}")

    @property
    def quantized(self) -> bool:
        return self.scheme != "fp32"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.scheme != "w4a8":
            d.pop("group_size")
            d.pop("int4_symmetric")
        if not self.quantized:
            d.pop("embedding")
            d.pop("lm_head")
        if not self.smooth:
            d.pop("smooth")
        return d


def check_scheme(fmt: str, scheme: str, supported: tuple[str, ...]) -> None:
    """Raise a clear error if ``fmt`` cannot do ``scheme``."""
    if scheme not in supported:
        raise FormatError(
            f"the {fmt} format cannot do scheme {scheme!r}; it can do: {', '.join(supported)}"
            + (" (XNNPACK has no fast weight-only int8 kernels; use w8a8)" if fmt == "pte" and scheme == "w8" else "")
        )


def _block_minimum_linear():
    """:class:`BlockMinimumLinear`, defined on first use (this module must import without torch)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class BlockSums:
        """``x`` summed over blocks of K (a linear with a 0/1 indicator, so XNNPACK delegates it).

        One per (K, block), shared by the layers that read the same input: q/k/v and gate/up
        call it with the same tensor, and the second and third calls reuse the first result
        (identity check, also under torch.export tracing), so the graph holds one sum per input."""

        def __init__(self, k: int, block: int) -> None:
            ind = torch.zeros(k // block, k)
            ind[torch.arange(k) // block, torch.arange(k)] = 1.0
            self.indicator = ind  # registered as a buffer by every BlockMinimumLinear that uses it
            self._last: tuple | None = None

        def __call__(self, x, indicator):
            if self._last is not None and self._last[0] is x:
                return self._last[1]
            sums = F.linear(x, indicator)
            self._last = (x, sums)
            return sums

    class BlockMinimumLinear(nn.Module):
        """``linear(x) + block_sums(x) @ offsets.T``: int4 weights with a float minimum per block.

        XNNPACK's blockwise int4 kernels (qb4w) are symmetric: ``w = scale * q``, q in -8..7.
        An asymmetric block ``w = scale * u + minimum`` (u in 0..15, GGUF's Q4_1 form) is
        ``scale * (u - 8)`` (symmetric, both ends of the grid used, so torchao's
        SYMMETRIC_NO_CLIPPING_ERR mapping recovers exactly this scale) plus a constant
        ``minimum + 8 * scale`` per block, which contributes ``sum(x over the block) * offset``:
        a float linear on the K/block block sums of ``x``, about 1/block of the layer's work.
        The same construction as the ONNX w4a8 lowering (``onnx_quant.blocks_with_minimum``).
        """

        def __init__(self, linear: nn.Linear, block: int, sums: BlockSums) -> None:
            super().__init__()
            w = linear.weight.detach().float()
            n, k = w.shape
            blocks = w.reshape(n, k // block, block)
            low, high = blocks.amin(-1), blocks.amax(-1)
            # bf16 scales: what XNNPACK stores for qb4w, so the grid below survives lowering exactly
            scale = ((high - low) / 15).to(torch.bfloat16).float()
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            u = torch.clamp(torch.round((blocks - low[..., None]) / scale[..., None]), 0, 15)
            self.linear = nn.Linear(k, n, bias=linear.bias is not None)
            self.linear.weight.data = (scale[..., None] * (u - 8)).reshape(n, k)
            if linear.bias is not None:
                self.linear.bias.data = linear.bias.detach().clone()
            self.sums = sums
            self.register_buffer("indicator", sums.indicator)
            self.offsets = nn.Parameter(low + 8 * scale, requires_grad=False)  # [N, K/block]

        def forward(self, x):
            return self.linear(x) + F.linear(self.sums(x, self.indicator), self.offsets)

    return BlockSums, BlockMinimumLinear


def fold_block_minimum(model, names: list[str], block: int) -> None:
    """Swap the linears ``names`` of ``model`` for ``BlockMinimumLinear`` (a symmetric int4-ready
    ``.linear``, which torchao then quantizes, plus float block offsets)."""
    sums_cls, cls = _block_minimum_linear()
    modules = dict(model.named_modules())
    shared: dict[int, object] = {}
    for name in names:
        parent, _, attr = name.rpartition(".")
        lin = modules[name]
        if lin.in_features not in shared:
            shared[lin.in_features] = sums_cls(lin.in_features, block)
        setattr(modules[parent] if parent else model, attr, cls(lin, block, shared[lin.in_features]))


def quantize_torchao(model, spec: QuantSpec) -> dict[str, Any]:
    """Quantize a canonical Decoder in place with torchao for ExecuTorch/XNNPACK.

    w8a8 -> int8 per-channel weights with dynamic int8 activations; w4a8 -> int4 weights in
    groups of ``spec.group_size`` with a float minimum per group (see :func:`fold_block_minimum`),
    or symmetric groups with ``spec.int4_symmetric``. A linear whose ``in_features``
    is not a multiple of the group size stays fp32 and is listed in the report. Returns counts of
    what was quantized.
    """
    import torch
    from torch import nn
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    int4 = spec.scheme == "w4a8"
    head_name = "output"
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    skipped = [n for n, m in linears.items() if int4 and n != head_name and m.in_features % spec.group_size]
    folded = int4 and not spec.int4_symmetric
    if folded:  # the tied LM head stays as it is: its weight is the embedding's
        fold_block_minimum(model, [n for n in linears if n != head_name and n not in skipped], spec.group_size)
        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    body_cfg = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4 if int4 else torch.int8,
        weight_granularity=PerGroup(spec.group_size) if int4 else PerAxis(0),
        weight_mapping_type=MappingType.SYMMETRIC_NO_CLIPPING_ERR if folded else MappingType.SYMMETRIC)
    head_cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    with torch.no_grad():
        if spec.embedding == "int8":
            quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
                      filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
        quantize_(model, body_cfg, filter_fn=lambda m, fqn: fqn in linears and fqn != head_name
                  and fqn not in skipped)
        if spec.lm_head == "int8":
            quantize_(model, head_cfg, filter_fn=lambda m, fqn: fqn == head_name)
        elif spec.lm_head == "scheme":
            if int4 and linears[head_name].in_features % spec.group_size:
                skipped.append(head_name)
            else:
                quantize_(model, body_cfg, filter_fn=lambda m, fqn: fqn == head_name)
    # torchao swaps a quantized weight for a tensor subclass; a plain Parameter stayed fp32
    quantized = [n for n, m in linears.items() if type(m.weight) is not nn.Parameter]
    return {
        "tool": "torchao",
        **({"zero_point": "float minimum per group (a float matmul on block sums)" if folded else "symmetric"}
           if int4 else {}),
        "linear_total": len(linears),
        "linear_quantized": len(quantized),
        "linear_left_fp32": sorted(set(linears) - set(quantized)),
        "embedding": spec.embedding,
        "lm_head": "fp32" if head_name not in quantized else ("int8" if spec.lm_head == "int8" else spec.scheme),
    }


def smooth_activations(reference, model, windows: list[list[int]], alpha: float) -> dict[str, Any]:
    """SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before w8a8.

    XNNPACK's dynamic int8 activations (pte, tflite) take one scale for a whole token row, so a
    few large channels (after the norm, and SwiGLU's product before the down projection) leave
    the other channels few levels. For each linear input channel j this divides the
    activation by ``s_j = max|X_j| ** alpha / max|W_:,j| ** (1 - alpha)`` and multiplies the
    weight column by it, with the division folded into the op that makes the activation:
    the norm's weight (and LayerNorm's bias) before q/k/v and gate/up, or the up projection's
    rows before down.
    The float model computes the same function; only the quantization error moves.

    ``reference`` (a functional Decoder) gives the activation ranges on ``windows``;
    ``model`` (a copy with the same weights, any cache mode) is rescaled in place. The tied
    LM head is left alone: its columns are the embedding's. torchao's own SmoothQuant wraps
    the linears in its observer modules, which ExecuTorch's XNNPACK path does not lower;
    folding the scales into existing weights keeps the exported graph unchanged.
    """
    import torch
    from torch import nn

    if not windows:
        raise ConversionError("smoothing needs calibration windows (LowerOptions.calibration)")
    points = []  # (name, producer kind, producer, consumer linears) per smoothing point
    for i, (rb, b) in enumerate(zip(reference.layers, model.layers)):
        a, m = rb.attn, rb.mlp
        conv = hasattr(b.attn, "w_in")  # LFM2's convolution layers: one projection after the norm
        qkv = [b.attn.w_in] if conv else [b.attn.wq, b.attn.wk, b.attn.wv]
        ups = [b.mlp.w_gate, b.mlp.w_up] if b.mlp.gated else [b.mlp.w_up]
        if b.shared_norm:  # Phi: one norm feeds q/k/v and the MLP, so one scale for all of them
            qkv, ups = qkv + ups, []
        if not hasattr(b.attn_norm, "weight"):  # OLMo 2: no norm before them, nothing to fold a scale into
            qkv, ups = [], []
        if qkv and all(isinstance(x, nn.Linear) for x in qkv):
            points.append((f"layers.{i}.attn_norm", a.w_in if conv else a.wq, "norm", b.attn_norm, qkv))
        if ups and all(isinstance(x, nn.Linear) for x in ups):
            points.append((f"layers.{i}.mlp_norm", m.w_up, "norm", b.mlp_norm, ups))
        # the down projection's input is linear in the up projection's rows only through SwiGLU's
        # product; GPT-2's GELU(up) is not, so there is no point there
        if b.mlp.gated and all(isinstance(x, nn.Linear) for x in (b.mlp.w_up, b.mlp.w_down)):
            points.append((f"layers.{i}.mlp.w_up", m.w_down, "rows", b.mlp.w_up, [b.mlp.w_down]))
    ranges: dict[str, torch.Tensor] = {}

    def observe(name):
        def hook(_mod, inp):
            x = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(0)
            ranges[name] = torch.maximum(ranges[name], x) if name in ranges else x
        return hook

    hooks = [ref_lin.register_forward_pre_hook(observe(name)) for name, ref_lin, *_ in points]
    try:
        with torch.no_grad():
            for w in windows:
                reference(torch.tensor([w]), torch.tensor([0]), reference.empty_caches())
    finally:
        for h in hooks:
            h.remove()
    spread = []
    with torch.no_grad():
        for name, _, kind, producer, linears in points:
            act = ranges[name].clamp(min=1e-5)
            wmax = torch.cat([lin.weight.abs() for lin in linears], 0).amax(0).clamp(min=1e-5)
            s = (act.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)
            for lin in linears:
                lin.weight.mul_(s)
            if kind == "norm":
                producer.weight.div_(s)
                if getattr(producer, "bias", None) is not None:  # LayerNorm
                    producer.bias.div_(s)
            else:
                producer.weight.div_(s[:, None])
                if producer.bias is not None:
                    producer.bias.div_(s)
            spread.append(float(act.max() / act.median()))
    return {"alpha": alpha, "points": len(points), "windows": len(windows),
            "max_over_median_range": round(max(spread), 1) if spread else None}
