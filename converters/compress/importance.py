"""Calibration statistics for structured pruning: what each FFN channel, attention head
and block contributes on real text.

One pass of the model over calibration windows records, per layer:

* the sum of squares of every input channel of ``mlp.w_down`` (the FFN hidden units) and
  of ``attn.wo`` (the concatenated head outputs): ``||x_j||`` over all calibration tokens;
* the *block influence* of each block, ``1 - cos(x_in, x_out)`` averaged over tokens
  (ShortGPT, Men et al. 2024): how much the block turns the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgelm.converters.model import Decoder


@dataclass
class Stats:
    ffn_sq: list[torch.Tensor]  # per layer [ffn_dim]: sum over tokens of x_j^2 at w_down's input
    head_sq: list[torch.Tensor]  # per layer [n_heads * head_dim]: same at wo's input
    block_influence: list[float]  # per layer: mean over tokens of 1 - cos(block input, block output)
    tokens: int


def forward_full(model: Decoder, tokens: torch.Tensor) -> torch.Tensor:
    """Logits at every position of ``tokens`` [B, S] from position 0: ``[B, S, vocab]``.

    Functional mode with window attention over empty caches, so attention costs S x S, not
    S x max_context, and gradients flow (used for training too)."""
    b, s = tokens.shape
    caches = [(torch.zeros(b, blk.attn.n_kv, 0, blk.attn.hd), torch.zeros(b, blk.attn.n_kv, 0, blk.attn.hd))
              for blk in model.layers]
    full, window = model.full_logits, model.window_attention
    model.full_logits, model.window_attention = True, True
    try:
        logits, _ = model(tokens, torch.tensor([0]), caches)
    finally:
        model.full_logits, model.window_attention = full, window
    return logits


@torch.no_grad()
def collect_stats(model: Decoder, windows: list[list[int]], batch: int = 4) -> Stats:
    """Run ``windows`` (token lists of one length) through ``model`` and record :class:`Stats`."""
    n = len(model.layers)
    ffn_sq = [torch.zeros(0)] * n
    head_sq = [torch.zeros(0)] * n
    influence = [0.0] * n
    hooks = []

    def sq_hook(store, i):
        def hook(_mod, args):
            x = args[0].detach().double()
            acc = (x * x).sum(dim=(0, 1))
            store[i] = acc if store[i].numel() == 0 else store[i] + acc
        return hook

    def block_hook(i):
        def hook(_mod, args, out):
            x_in, x_out = args[0].double(), out[0].double()
            cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)
            influence[i] += float((1 - cos).sum())
        return hook

    for i, blk in enumerate(model.layers):
        hooks.append(blk.mlp.w_down.register_forward_pre_hook(sq_hook(ffn_sq, i)))
        hooks.append(blk.attn.wo.register_forward_pre_hook(sq_hook(head_sq, i)))
        hooks.append(blk.register_forward_hook(block_hook(i)))
    tokens = 0
    try:
        for k in range(0, len(windows), batch):
            chunk = torch.tensor(windows[k:k + batch])
            forward_full(model, chunk)
            tokens += chunk.numel()
    finally:
        for h in hooks:
            h.remove()
    return Stats(ffn_sq, head_sq, [v / max(tokens, 1) for v in influence], tokens)


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of every input column of a linear weight [out, in]."""
    return weight.detach().double().norm(dim=0)


def ffn_channel_scores(w_down: torch.Tensor, ffn_sq: torch.Tensor) -> torch.Tensor:
    """Score of FFN channel j: ``||x_j|| * ||W_down[:, j]||``.

    Why this criterion: channel j adds ``W_down[:, j] * x_j`` to the residual stream, and the
    squared norm of that contribution summed over the calibration tokens is exactly
    ``||W_down[:, j]||^2 * sum_t x_j(t)^2``. Its square root is the size of what removing the
    channel takes away (activation-weighted magnitude, as in Wanda / FLAP); plain weight
    magnitude ignores that some channels rarely fire, activation norm alone ignores the
    weight that scales them. A channel with a zero down-projection column scores 0 and goes
    first, so removing it changes nothing.
    """
    return ffn_sq.sqrt() * column_norms(w_down)


def head_scores(wo: torch.Tensor, head_sq: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Score of each query head: the same contribution norm over the head's ``head_dim``
    channels at ``wo``'s input, ``sqrt(sum_c ||x_c||^2 ||W_o[:, c]||^2)``."""
    per_channel = head_sq * column_norms(wo) ** 2
    return per_channel.view(n_heads, -1).sum(-1).sqrt()
