"""Pruning. Structured pruning removes real compute and gives a smaller plain model (per-layer
head counts and FFN widths in the config, so ``build_decoder`` and every lowering take it
unchanged); unstructured pruning only zeroes weights.

Structured steps work on ``(config, state_dict)`` pairs with canonical names:

* :func:`drop_layers` removes whole blocks (renumbering the rest);
* :func:`keep_ffn_channels` keeps some FFN hidden units per layer (rows of ``w_gate``/``w_up``,
  columns of ``w_down``);
* :func:`keep_heads` keeps some query heads per layer, GQA-aware: query head ``j`` reads KV
  head ``j // group`` (the decoder folds consecutive query heads onto one KV head), so either
  every KV group keeps the same number of query heads, or whole groups (their K/V rows and
  all their query heads) go.

:func:`structured_prune` chooses what to remove from calibration statistics
(:mod:`.importance`).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from edgelm.config import ModelConfig
from edgelm.converters.compress import CompressionError
from edgelm.converters.compress.importance import collect_stats, ffn_channel_scores, head_scores
from edgelm.converters.model import build_decoder

log = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]


def _replace(cfg: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(cfg, **changes)


def drop_layers(cfg: ModelConfig, sd: StateDict, drop: list[int]) -> tuple[ModelConfig, StateDict]:
    """Remove the blocks in ``drop``; the others keep their order and are renumbered."""
    drop_set = set(drop)
    if not drop_set <= set(range(cfg.n_layers)) or len(drop_set) >= cfg.n_layers:
        raise CompressionError(f"cannot drop layers {sorted(drop_set)} of a {cfg.n_layers}-layer model")
    keep = [i for i in range(cfg.n_layers) if i not in drop_set]
    new_index = {old: new for new, old in enumerate(keep)}
    out: StateDict = {}
    for key, value in sd.items():
        if key.startswith("layers."):
            _, idx, rest = key.split(".", 2)
            if int(idx) in drop_set:
                continue
            key = f"layers.{new_index[int(idx)]}.{rest}"
        out[key] = value
    low_rank = None
    if cfg.low_rank:
        low_rank = {}
        for name, r in cfg.low_rank.items():
            _, idx, rest = name.split(".", 2)
            if int(idx) not in drop_set:
                low_rank[f"layers.{new_index[int(idx)]}.{rest}"] = r

    def kept(layers: list[int] | None) -> list[int] | None:
        return None if layers is None else [new_index[i] for i in layers if i not in drop_set]

    # the local (sliding-window, Gemma 3 rotary) layers that stay; None still means every layer slides
    local, conv = kept(cfg.local_layers), kept(cfg.conv_layers)
    new = _replace(cfg, n_layers=len(keep), n_heads=[cfg.n_heads[i] for i in keep],
                   n_kv_heads=[cfg.n_kv_heads[i] for i in keep], ffn_dim=[cfg.ffn_dim[i] for i in keep],
                   low_rank=low_rank or None, local_layers=local or None,
                   local_rope_theta=cfg.local_rope_theta if local else None,
                   sliding_window=cfg.sliding_window if local is None or local else None,
                   nope_layers=kept(cfg.nope_layers) or None, conv_layers=conv or None,
                   conv_kernel=cfg.conv_kernel if conv else None)
    return new, out


def _check_dense(cfg: ModelConfig, layer: int, kind: str) -> None:
    if any(name.startswith(f"layers.{layer}.{kind}.") for name in cfg.low_rank or {}):
        raise CompressionError("structured pruning runs before low-rank factorization; prune the dense model")


def keep_ffn_channels(cfg: ModelConfig, sd: StateDict, keep: dict[int, torch.Tensor]) -> tuple[ModelConfig, StateDict]:
    """Keep FFN channels ``keep[layer]`` (sorted indices) in each listed layer."""
    sd = dict(sd)
    ffn = list(cfg.ffn_dim)
    for i, idx in keep.items():
        _check_dense(cfg, i, "mlp")
        idx = torch.as_tensor(idx, dtype=torch.long).sort().values
        p = f"layers.{i}.mlp."
        for name in ("w_gate", "w_up") if cfg.gated_mlp else ("w_up",):
            sd[p + name + ".weight"] = sd[p + name + ".weight"][idx].clone()
            if p + name + ".bias" in sd:
                sd[p + name + ".bias"] = sd[p + name + ".bias"][idx].clone()
        sd[p + "w_down.weight"] = sd[p + "w_down.weight"][:, idx].clone()
        ffn[i] = len(idx)
    return _replace(cfg, ffn_dim=ffn), sd


def keep_heads(cfg: ModelConfig, sd: StateDict, keep: dict[int, list[int]]) -> tuple[ModelConfig, StateDict]:
    """Keep query heads ``keep[layer]`` in each listed layer, GQA-aware.

    The kept heads must either cover every KV group equally (same number of query heads
    per group: the group size changes, the KV heads stay), or be all the heads of a subset
    of groups (those KV heads stay, the others go)."""
    sd = dict(sd)
    n_heads, n_kv = list(cfg.n_heads), list(cfg.n_kv_heads)
    hd = cfg.head_dim
    for i, heads in keep.items():
        _check_dense(cfg, i, "attn")
        heads = sorted(int(h) for h in heads)
        g = cfg.n_heads[i] // cfg.n_kv_heads[i]
        per_group: dict[int, int] = {}
        for h in heads:
            per_group[h // g] = per_group.get(h // g, 0) + 1
        counts = set(per_group.values())
        if len(counts) != 1:
            raise CompressionError(f"layer {i}: kept heads {heads} give KV groups different query-head counts")
        groups = sorted(per_group)
        if len(groups) != cfg.n_kv_heads[i] and counts != {g}:
            raise CompressionError(f"layer {i}: drop whole KV groups or query heads within every group, not both")
        q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
        kv_rows = torch.cat([torch.arange(k * hd, (k + 1) * hd) for k in groups])
        p = f"layers.{i}.attn."
        for name, rows in (("wq", q_rows), ("wk", kv_rows), ("wv", kv_rows)):
            sd[p + name + ".weight"] = sd[p + name + ".weight"][rows].clone()
            if p + name + ".bias" in sd:
                sd[p + name + ".bias"] = sd[p + name + ".bias"][rows].clone()
        sd[p + "wo.weight"] = sd[p + "wo.weight"][:, q_rows].clone()
        if cfg.qk_norm_full:  # OLMo 2's q/k norms span every head: keep the kept heads' part. Not exact (the
            # norm's mean now runs over fewer heads): distillation is what makes up for it
            for name, rows in (("q_norm", q_rows), ("k_norm", kv_rows)):
                sd[p + name + ".weight"] = sd[p + name + ".weight"][rows].clone()
        n_heads[i], n_kv[i] = len(heads), len(groups)
    return _replace(cfg, n_heads=n_heads, n_kv_heads=n_kv), sd


def _round_keep(total: int, fraction: float, multiple: int) -> int:
    """Channels kept when ``fraction`` of ``total`` go, rounded to a multiple (at least one multiple)."""
    keep = total * (1.0 - fraction)
    multiple = max(1, min(multiple, total))
    return int(min(total, max(multiple, round(keep / multiple) * multiple)))


def choose_layers(influence: list[float], n: int) -> list[int]:
    """The ``n`` blocks with the lowest block influence (``1 - cos(in, out)``).

    Why this criterion: a residual block whose output stream points where its input did
    (cosine near 1) mostly passes the stream through; removing it changes the next block's
    input least. It needs one forward pass, no gradients, and ranks whole layers on the
    quantity that dropping them perturbs. A block that is an exact identity scores 0."""
    return sorted(sorted(range(len(influence)), key=lambda i: influence[i])[:n])


def choose_heads(scores: torch.Tensor, n_kv: int, fraction: float, granularity: str) -> list[int]:
    """Query heads to keep in one layer, given per-head scores. Multi-head attention (one query
    head per KV head, GPT-2) drops whole heads at either granularity."""
    h = scores.numel()
    g = h // n_kv
    if granularity == "group" or g == 1:
        n_drop = min(n_kv - 1, round(n_kv * fraction))
        group_scores = (scores.view(n_kv, g) ** 2).sum(-1)  # the groups' total contribution
        kept = sorted(group_scores.argsort(descending=True)[:n_kv - n_drop].tolist())
        return [k * g + j for k in kept for j in range(g)]
    if granularity != "query":
        raise CompressionError(f"unknown head granularity {granularity!r}; use 'query' or 'group'")
    n_drop = min(g - 1, round(g * fraction))
    keep = []
    for k in range(n_kv):
        within = scores[k * g:(k + 1) * g]
        keep += [k * g + int(j) for j in within.argsort(descending=True)[:g - n_drop]]
    return sorted(keep)


def structured_prune(cfg: ModelConfig, sd: StateDict, windows: list[list[int]], *, drop: int = 0,
                     heads: float = 0.0, ffn: float = 0.0, granularity: str = "query",
                     multiple_of: int = 32) -> tuple[ModelConfig, StateDict, list[int], dict]:
    """Drop ``drop`` layers, then prune ``heads`` and ``ffn`` fractions per layer, ranked on
    calibration ``windows``. Returns the new config and weights, the map from new layer to
    original layer (for hidden-state distillation), and a report of what was removed."""
    layer_map = list(range(cfg.n_layers))
    report: dict = {}
    if drop:
        stats = collect_stats(build_decoder(cfg, sd), windows)
        gone = choose_layers(stats.block_influence, drop)
        report["dropped_layers"] = gone
        report["block_influence"] = [round(v, 5) for v in stats.block_influence]
        cfg, sd = drop_layers(cfg, sd, gone)
        layer_map = [i for i in layer_map if i not in set(gone)]
        log.info("dropped layers %s (block influence %s)", gone, [report["block_influence"][i] for i in gone])
    if heads or ffn:  # statistics of the model as it is now: after any layer drop
        stats = collect_stats(build_decoder(cfg, sd), windows)
        if heads:
            keep = {}
            for i in range(cfg.n_layers):
                if cfg.is_conv(i):  # LFM2's convolution layers have no heads
                    continue
                s = head_scores(sd[f"layers.{i}.attn.wo.weight"], stats.head_sq[i], cfg.n_heads[i])
                keep[i] = choose_heads(s, cfg.n_kv_heads[i], heads, granularity)
            before = list(cfg.n_heads)
            cfg, sd = keep_heads(cfg, sd, keep)
            report["heads"] = {"granularity": granularity, "before": before, "after": list(cfg.n_heads),
                               "kv_heads_after": list(cfg.n_kv_heads)}
            if cfg.n_heads == before:
                log.warning("--prune-heads %.2f removes no head at this granularity (group sizes %s)", heads,
                            [h // k for h, k in zip(before, cfg.n_kv_heads)])
        if ffn:
            keep_idx = {}
            for i in range(cfg.n_layers):
                s = ffn_channel_scores(sd[f"layers.{i}.mlp.w_down.weight"], stats.ffn_sq[i])
                n_keep = _round_keep(cfg.ffn_dim[i], ffn, multiple_of)
                keep_idx[i] = s.argsort(descending=True)[:n_keep].sort().values
            before = list(cfg.ffn_dim)
            cfg, sd = keep_ffn_channels(cfg, sd, keep_idx)
            report["ffn"] = {"before": before, "after": list(cfg.ffn_dim)}
    return cfg, sd, layer_map, report


# ---- unstructured ---------------------------------------------------------------------------

def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules inside the blocks (not the embedding or the LM head)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")}


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "layer") -> tuple[dict[str, torch.Tensor], dict]:
    """Zero the smallest-magnitude weights of the block linears; return the keep-masks and a report.

    ``scope="layer"``: every matrix to ``sparsity``; ``"global"``: one magnitude threshold over all
    of them (layers with smaller weights lose more). The zeros stay in dense tensors: dense
    runtimes (XNNPACK, onnxruntime, LiteRT) do exactly the same work, so this saves only what a
    compressed file or a sparse kernel makes of it, never latency by itself.
    """
    if not 0 <= sparsity < 1:
        raise CompressionError(f"sparsity must be in [0, 1), got {sparsity}")
    linears = block_linears(model)
    masks: dict[str, torch.Tensor] = {}
    if scope == "global":
        mags = torch.cat([m.weight.abs().flatten() for m in linears.values()])
        k = int(sparsity * mags.numel())
        threshold = mags.kthvalue(k).values if k > 0 else mags.new_tensor(-1.0)
        for name, m in linears.items():
            masks[name] = m.weight.abs() > threshold
    elif scope == "layer":
        for name, m in linears.items():
            k = int(sparsity * m.weight.numel())
            if k == 0:
                masks[name] = torch.ones_like(m.weight, dtype=torch.bool)
                continue
            threshold = m.weight.abs().flatten().kthvalue(k).values
            masks[name] = m.weight.abs() > threshold
    else:
        raise CompressionError(f"unknown sparsity scope {scope!r}; use 'layer' or 'global'")
    zeros = total = 0
    for name, m in linears.items():
        m.weight.mul_(masks[name])
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    report = {
        "target": sparsity, "scope": scope, "achieved": zeros / max(total, 1), "weights": total,
        "zeros": zeros,
        "note": "unstructured zeros are stored densely: dense runtimes (XNNPACK, onnxruntime, LiteRT) do not "
                "run it faster, and the file is no smaller unless compressed; the gain needs sparse kernels "
                "or compressed storage",
    }
    return masks, report


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> None:
    """Re-zero pruned weights (after an optimizer step)."""
    if not masks:
        return
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            modules[name].weight.mul_(mask)


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding / LM head counted once)."""
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


def sparsity_of(model: nn.Module) -> float:
    linears = block_linears(model)
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    return zeros / max(1, sum(m.weight.numel() for m in linears.values()))

