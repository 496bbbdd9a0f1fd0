"""What speculative decoding can gain for a target (.pte or .onnx) and candidate drafts.

1. The cost of one target pass over 1, 2, 4, 6 and 8 tokens (``decode`` / ``verify``): how much
   more a pass checking a draft run costs than a plain decode step.
2. Each draft's teacher-forced agreement with the target's greedy tokens: the target answers
   some chat prompts greedily, each draft reads the same tokens and predicts the next one.

    python scripts/speculative_probe.py TARGET [DRAFT ...] [--tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from edgelm.runtime import Engine

PROMPTS = ["Explain how a bicycle gear system works.", "Write a short poem about the sea.",
           "What are the main causes of inflation?", "Give me three tips for learning Python.",
           "Describe the water cycle to a child."]


def pass_times(engine: Engine, lengths=(1, 2, 4, 6, 8), reps: int = 7) -> dict[int, float]:
    """Median ms of one target pass over ``n`` tokens, after a chat prompt."""
    b = engine.backend
    ids = engine.encode_prompt(PROMPTS[0], chat=True)
    engine._prefill(ids)
    out = {}
    for n in lengths:
        toks = np.asarray((ids * 2)[:n], dtype=np.int64)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            b.decode(int(toks[0]), len(ids)) if n == 1 else b.verify(toks, len(ids))
            times.append(time.perf_counter() - t0)
        out[n] = 1e3 * statistics.median(times)
    return out


def agreement(target: Engine, drafts: list[Engine], tokens: int) -> list[float]:
    """Share of the target's greedy tokens each draft predicts, teacher-forced."""
    seqs = []
    for p in PROMPTS:
        ids = target.encode_prompt(p, chat=True)
        seqs.append((ids, list(target.generate_ids(ids, tokens, ignore_eos=True))))
    shares = []
    for d in drafts:
        hits = []
        for ids, out in seqs:
            logits, pos = d._prefill(ids), len(ids)
            for t in out:
                hits.append(int(np.argmax(logits)) == t)
                logits = d.backend.decode(t, pos)
                pos += 1
        shares.append(float(np.mean(hits)))
    return shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target")
    ap.add_argument("drafts", nargs="*")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    target = Engine.load(a.target, threads=a.threads)
    for n, ms in pass_times(target).items():
        print(f"target pass over {n} token(s): {ms:.1f} ms")
    drafts = [Engine.load(d, threads=a.threads) for d in a.drafts]
    for d, share in zip(a.drafts, agreement(target, drafts, a.tokens)):
        print(f"{d}: agrees with the target's greedy token {share:.1%} of the time "
              f"({len(PROMPTS)} prompts x {a.tokens} tokens)")


if __name__ == "__main__":
    main()
