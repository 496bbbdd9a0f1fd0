"""Parity check of a lowered artifact: the real file in its real runtime against the
fp32 PyTorch reference (the canonical decoder in eager mode).

The reference generates greedily; the artifact is teacher-forced on the same tokens,
so every position compares like with like: max absolute logit error, top-1
agreement, and mean KL(reference || artifact).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgelm.errors import VerificationError

VERIFY_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
)


@dataclass
class ParityGate:
    """Thresholds a lowered artifact must meet. The fp32 defaults catch a broken lowering."""

    max_abs_err: float = 0.05
    min_top1: float = 0.98


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def reference_run(model, prompt_ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits at each step (``steps + 1`` rows) from the eager reference."""
    ref = model.make_stateful("plain") if not model.stateful else model
    tokens, rows = [], []
    with torch.no_grad():
        logits = ref(torch.tensor([prompt_ids]), torch.tensor([0]))[0]
        pos = len(prompt_ids)
        for _ in range(steps):
            rows.append(logits.numpy().copy())
            tok = int(logits.argmax())
            tokens.append(tok)
            logits = ref(torch.tensor([[tok]]), torch.tensor([pos]))[0]
            pos += 1
        rows.append(logits.numpy().copy())
    return tokens, np.stack(rows)


def artifact_run(engine, prompt_ids: list[int], tokens: list[int]) -> np.ndarray:
    """Logits of the artifact teacher-forced on ``tokens`` (same rows as :func:`reference_run`)."""
    rows = [engine._prefill(prompt_ids).copy()]
    pos = len(prompt_ids)
    for tok in tokens:
        rows.append(engine.backend.decode(tok, pos).copy())
        pos += 1
    return np.stack(rows)


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Max abs error, top-1 agreement and mean KL between two stacks of logit rows."""
    lp, lq = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {
        "max_abs_err": float(np.abs(ref - got).max()),
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
        "mean_kl": float(kl.mean()),
        "positions": int(ref.shape[0]),
    }


def check_parity(reference_model, engine, prompts=VERIFY_PROMPTS, steps: int = 32,
                 gate: ParityGate | None = None) -> dict:
    """Run the parity check; raise :class:`VerificationError` if the gate fails.

    Returns the numbers that go into the manifest's ``verification`` section.
    """
    gate = gate or ParityGate()
    chat = bool(engine.manifest.chat_template)
    refs, gots = [], []
    steps = min(steps, engine.max_context // 2)  # a small context keeps half of it for the prompt
    for prompt in prompts:
        ids = engine.encode_prompt(prompt, chat=chat)[: engine.max_context - steps - 1]
        tokens, ref = reference_run(reference_model, ids, steps)
        refs.append(ref)
        gots.append(artifact_run(engine, ids, tokens))
    result = compare(np.concatenate(refs), np.concatenate(gots))
    result.update(prompts=len(prompts), steps=steps,
                  gate={"max_abs_err": gate.max_abs_err, "min_top1": gate.min_top1})
    failures = []
    if not result["max_abs_err"] <= gate.max_abs_err:
        failures.append(f"max logit error {result['max_abs_err']:.4g} > {gate.max_abs_err}")
    if not result["top1_agreement"] >= gate.min_top1:
        failures.append(f"top-1 agreement {result['top1_agreement']:.3f} < {gate.min_top1}")
    result["passed"] = not failures
    if failures:
        raise VerificationError(
            f"the {engine.manifest.format} artifact does not match the PyTorch reference: {'; '.join(failures)}. "
            "No bundle was written. Re-run with -v to see the lowering log, or report it with the source model."
        )
    return result
