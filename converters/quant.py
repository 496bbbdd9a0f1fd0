"""Quantization schemes, named once for every format.

=============  ==========================================================  ==============================
scheme         meaning                                                     formats
=============  ==========================================================  ==============================
fp32           no quantization                                             pte, onnx, tflite
w8             int8 weights per output channel, float activations          onnx, tflite
w8a8           int8 weights per channel, int8 activations (dynamic)        pte, onnx, tflite
w8a8-static    int8 weights and activations, calibrated ranges             onnx
w4a8           int4 weights in groups of ``group_size``, dynamic int8 act  pte, onnx, tflite
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

from edgelm.errors import FormatError

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

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise FormatError(f"unknown quantization scheme {self.scheme!r}; choose one of: {', '.join(SCHEMES)}")
        if self.embedding not in EMBEDDING_CHOICES:
            raise FormatError(f"embedding must be one of {EMBEDDING_CHOICES}, got {self.embedding!r}")
        if self.lm_head not in LM_HEAD_CHOICES:
            raise FormatError(f"lm_head must be one of {LM_HEAD_CHOICES}, got {self.lm_head!r}")
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise FormatError(f"group size must be a power of two >= 16, got {self.group_size}")

    @property
    def quantized(self) -> bool:
        return self.scheme != "fp32"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.scheme != "w4a8":
            d.pop("group_size")
        if not self.quantized:
            d.pop("embedding")
            d.pop("lm_head")
        return d


def check_scheme(fmt: str, scheme: str, supported: tuple[str, ...]) -> None:
    """Raise a clear error if ``fmt`` cannot do ``scheme``."""
    if scheme not in supported:
        raise FormatError(
            f"the {fmt} format cannot do scheme {scheme!r}; it can do: {', '.join(supported)}"
            + (" (XNNPACK has no fast weight-only int8 kernels; use w8a8)" if fmt == "pte" and scheme == "w8" else "")
        )


def quantize_torchao(model, spec: QuantSpec) -> dict[str, Any]:
    """Quantize a canonical Decoder in place with torchao for ExecuTorch/XNNPACK.

    w8a8 -> int8 per-channel weights with dynamic int8 activations; w4a8 -> int4 weights in
    groups of ``spec.group_size``. A linear whose ``in_features`` is not a multiple of the group
    size stays fp32 and is listed in the report. Returns counts of what was quantized.
    """
    import torch
    from torch import nn
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    int4 = spec.scheme == "w4a8"
    body_cfg = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4 if int4 else torch.int8,
        weight_granularity=PerGroup(spec.group_size) if int4 else PerAxis(0))
    head_cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    head_name = "output"
    skipped = [n for n, m in linears.items() if int4 and n != head_name and m.in_features % spec.group_size]
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
        "linear_total": len(linears),
        "linear_quantized": len(quantized),
        "linear_left_fp32": sorted(set(linears) - set(quantized)),
        "embedding": spec.embedding,
        "lm_head": "fp32" if head_name not in quantized else ("int8" if spec.lm_head == "int8" else spec.scheme),
    }
