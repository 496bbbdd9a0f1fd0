"""Low-rank factorization of block linears by truncated SVD.

``W [out, in] ~= B [out, r] @ A [r, in]`` with ``A = sqrt(S_r) V_r^T`` and ``B = U_r sqrt(S_r)``
(the singular values split evenly, so both factors have similar scale for training and
quantization). The factored layer is :class:`~edgelm.converters.model.LowRankLinear`, two plain
``nn.Linear``; the config records the rank per module (``ModelConfig.low_rank``), so the
model rebuilds with ``build_decoder`` and lowers like any other.

A factorization is used only where it is smaller: ``r * (in + out) < in * out``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from edgelm.config import ModelConfig
from edgelm.converters.compress import CompressionError

StateDict = dict[str, torch.Tensor]
PROJECTIONS = {"attn": ("wq", "wk", "wv", "wo", "w_in"), "mlp": ("w_gate", "w_up", "w_down")}  # w_in: LFM2


def factor(weight: torch.Tensor, rank: int, svd=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [rank, in], B [out, rank])`` with ``B @ A`` the best rank-``rank`` approximation of ``weight``
    (``svd``: its ``(U, S, Vh)`` if already computed)."""
    u, s, vh = svd if svd is not None else torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root[None, :]
    return a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous()


def rank_for(singular: torch.Tensor, n_in: int, n_out: int, energy: float | None = None,
             budget: float | None = None, multiple_of: int = 1) -> int:
    """Rank that keeps ``energy`` of ``sum(s^2)``, or whose two factors hold ``budget`` of the
    layer's ``in * out`` parameters; rounded up to ``multiple_of`` (capped at full rank)."""
    full = min(n_in, n_out)
    if energy is not None:
        share = (singular.double() ** 2).cumsum(0) / (singular.double() ** 2).sum()
        r = int((share < energy - 1e-12).sum()) + 1
    elif budget is not None:
        r = max(1, math.floor(budget * n_in * n_out / (n_in + n_out)))
    else:
        raise CompressionError("low-rank needs an energy threshold or a parameter budget")
    if multiple_of > 1:
        r = math.ceil(r / multiple_of) * multiple_of
    return min(r, full)


def is_smaller(rank: int, n_in: int, n_out: int) -> bool:
    return rank * (n_in + n_out) < n_in * n_out


def low_rank(cfg: ModelConfig, sd: StateDict, energy: float | None = None, budget: float | None = None,
             targets: str = "all", multiple_of: int = 1) -> tuple[ModelConfig, StateDict, dict]:
    """Factor every targeted dense block linear where the chosen rank makes it smaller."""
    kinds = ("attn", "mlp") if targets == "all" else (targets,)
    if any(k not in PROJECTIONS for k in kinds):
        raise CompressionError(f"unknown low-rank targets {targets!r}; use all, attn or mlp")
    sd = dict(sd)
    ranks = dict(cfg.low_rank or {})
    layers: dict[str, dict] = {}
    for i in range(cfg.n_layers):
        for kind in kinds:
            for proj in PROJECTIONS[kind]:
                name = f"layers.{i}.{kind}.{proj}"
                if name in ranks or name not in cfg.block_linears(i):  # GPT-2 has no w_gate
                    continue
                n_in, n_out = cfg.linear_shape(name)
                w = sd[name + ".weight"]
                svd = torch.linalg.svd(w.detach().double(), full_matrices=False)
                s = svd[1]
                r = rank_for(s, n_in, n_out, energy, budget, multiple_of)
                kept = float((s[:r] ** 2).sum() / (s ** 2).sum())
                if not is_smaller(r, n_in, n_out):
                    layers[name] = {"rank": r, "used": False, "energy": kept}
                    continue
                a, b = factor(w, r, svd)
                sd[name + ".a.weight"], sd[name + ".b.weight"] = a, b
                del sd[name + ".weight"]
                if name + ".bias" in sd:
                    sd[name + ".b.bias"] = sd.pop(name + ".bias")
                ranks[name] = r
                layers[name] = {"rank": r, "used": True, "energy": kept,
                                "params_before": n_in * n_out, "params_after": r * (n_in + n_out)}
    new = dataclasses.replace(cfg, low_rank=ranks or None)
    used = [v for v in layers.values() if v["used"]]
    report = {
        "energy": energy, "budget": budget, "targets": targets,
        "factored": len(used), "considered": len(layers),
        "params_saved": sum(v["params_before"] - v["params_after"] for v in used),
        "layers": layers,
    }
    return new, sd, report
