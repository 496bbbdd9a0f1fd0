"""Quality of a lowered (and possibly quantized) artifact on held-out text, measured in its
own runtime against the fp32 PyTorch reference: greedy top-1 agreement per position,
mean KL(reference || artifact), and perplexity of both.

Text comes from user files or folders, or from the built-in sets in ``converters/data``
(written by the fp32 model itself from seeded prompts; see ``scripts/make_eval_data.py``).
Calibration and evaluation never share text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgelm.errors import SourceError, VerificationError

DATA = Path(__file__).resolve().parent / "data"
BUILTIN = {"eval": DATA / "heldout.txt", "calibration": DATA / "calibration.txt"}
TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass
class QualityGate:
    """Thresholds on held-out text. The defaults catch a broken model, not a slightly worse one."""

    min_top1: float = 0.80
    max_ppl_increase: float = 0.25  # relative to the fp32 reference


def load_texts(path: str | Path | None, kind: str = "eval") -> list[str]:
    """Documents from a file, a folder of text files, or the built-in set (``kind`` eval|calibration)."""
    if path is None:
        p = BUILTIN[kind]
        if not p.is_file():
            raise SourceError(f"the built-in {kind} text {p} is missing; reinstall edgelm or pass a file")
        return [d.strip() for d in p.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise SourceError(f"{p}: no text files ({', '.join(TEXT_SUFFIXES)}) in this folder")
    elif p.is_file():
        files = [p]
    else:
        raise SourceError(f"{kind} text {p} does not exist")
    docs = []
    for f in files:
        try:
            docs.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise SourceError(f"{f}: not UTF-8 text ({e})") from e
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise SourceError(f"{p}: the {kind} text is empty")
    return docs


def token_windows(tokenizer, texts: list[str], seq_len: int, max_windows: int) -> list[list[int]]:
    """Cut the token stream of ``texts`` into up to ``max_windows`` windows of ``seq_len`` tokens."""
    stream: list[int] = []
    for doc in texts:
        stream += tokenizer.encode(doc, add_special_tokens=False)
        if len(stream) >= seq_len * max_windows:
            break
    windows = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)][:max_windows]
    if not windows:
        raise SourceError(f"the evaluation text has {len(stream)} tokens; need at least {seq_len}")
    return windows


def reference_logits(model, window: list[int]) -> np.ndarray:
    """fp32 eager logits at every position of ``window`` ([L, vocab])."""
    full = model.full_logits
    model.full_logits = True
    try:
        with torch.no_grad():
            out = model(torch.tensor([window]), torch.tensor([0]), model.empty_caches())[0]
    finally:
        model.full_logits = full
    return out[0].numpy()


def artifact_logits(engine, window: list[int]) -> np.ndarray:
    """The artifact's logits at every position, teacher-forced one token at a time."""
    decode = engine.backend.decode
    return np.stack([decode(tok, pos).copy() for pos, tok in enumerate(window)])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def quality_report(reference_model, engine, texts: list[str], seq_len: int = 128, max_windows: int = 8,
                   gate: QualityGate | None = None) -> dict:
    """Measure the artifact behind ``engine`` on ``texts``; raise if ``gate`` is given and fails."""
    seq_len = min(seq_len, engine.max_context)
    windows = token_windows(engine.tokenizer, texts, seq_len, max_windows)
    top1, kl, nll_ref, nll_art = [], [], [], []
    t_art = 0.0
    for w in windows:
        ref = _log_softmax(reference_logits(reference_model, w))
        t = time.perf_counter()
        got = _log_softmax(artifact_logits(engine, w))
        t_art += time.perf_counter() - t
        top1.append(ref.argmax(-1) == got.argmax(-1))
        kl.append((np.exp(ref) * (ref - got)).sum(-1))
        nxt = np.asarray(w[1:])
        nll_ref.append(-ref[np.arange(len(nxt)), nxt])
        nll_art.append(-got[np.arange(len(nxt)), nxt])
    tokens = sum(len(w) for w in windows)
    ppl_ref = float(np.exp(np.concatenate(nll_ref).mean()))
    ppl = float(np.exp(np.concatenate(nll_art).mean()))
    result = {
        "top1_agreement": float(np.concatenate(top1).mean()),
        "mean_kl": float(np.concatenate(kl).mean()),
        "perplexity": ppl,
        "perplexity_fp32": ppl_ref,
        "perplexity_increase": ppl / ppl_ref - 1.0,
        "tokens": tokens,
        "windows": len(windows),
        "teacher_forced_tps": tokens / t_art if t_art else 0.0,
    }
    if gate is not None:
        result["gate"] = {"min_top1": gate.min_top1, "max_ppl_increase": gate.max_ppl_increase}
        failures = []
        if not result["top1_agreement"] >= gate.min_top1:
            failures.append(f"top-1 agreement {result['top1_agreement']:.3f} < {gate.min_top1}")
        if not result["perplexity_increase"] <= gate.max_ppl_increase:
            failures.append(f"perplexity {ppl:.3f} is {result['perplexity_increase']:+.1%} against fp32 "
                            f"{ppl_ref:.3f} (allowed +{gate.max_ppl_increase:.0%})")
        result["passed"] = not failures
        if failures:
            raise VerificationError(
                f"the {engine.manifest.format}/{engine.manifest.scheme} artifact fails the quality gate on held-out "
                f"text: {'; '.join(failures)}. Try a milder scheme (e.g. w8a8 instead of w4a8), a smaller "
                "--group-size, --lm-head int8, or relax the gate (--min-top1 / --max-ppl-increase)."
            )
    return result
