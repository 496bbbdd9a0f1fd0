"""What choosing the next token costs, per token, on a bundle's real logits.

    python scripts/sampling_cost.py BUNDLE [--tokens 40] [--repeats 5]

Records the logits of a greedy generation (the prompt, then ``--tokens`` steps), then times
:class:`edgelm.sampling.Sampler` over those rows for greedy decoding and a few common sampling
settings: the median over ``--repeats`` passes, in ms per token. Compare it with the decode
step (``edgelm run --stats``) to see what sampling adds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from edgelm.runtime import Engine
from edgelm.sampling import Sampler, SamplingConfig

SETTINGS = [
    {},
    {"temperature": 0.7},
    {"temperature": 0.7, "top_k": 40},
    {"temperature": 0.7, "top_p": 0.9},
    {"temperature": 0.7, "top_k": 40, "top_p": 0.9},
    {"temperature": 1.0, "top_p": 0.95, "repetition_penalty": 1.1},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    engine = Engine.load(args.bundle, threads=2)
    ids = engine.encode_prompt("Write a short story about a robot who learns to paint.",
                               chat=bool(engine.manifest.chat_template))
    rows = [engine._prefill(ids).copy()]
    for pos in range(len(ids), len(ids) + args.tokens):
        rows.append(engine.backend.decode(int(np.argmax(rows[-1])), pos).copy())
    print(f"{args.bundle}: vocabulary {rows[0].size}, {len(rows)} logit rows, median of {args.repeats} passes")
    for kw in SETTINGS:
        sampler = Sampler(SamplingConfig(seed=0, **kw))
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for r in rows:
                sampler(r, ids)
            times.append((time.perf_counter() - t) / len(rows))
        label = ", ".join(f"{k} {v}" for k, v in kw.items()) or "greedy"
        print(f"  {label:<50} {statistics.median(times) * 1e3:6.2f} ms a token")


if __name__ == "__main__":
    main()
