"""Prefill and decode speed of several bundles, measured in turns in one process.

    python scripts/interleaved_decode.py POSITION BUNDLE... [--rounds 7] [--steps 32] [--threads 2]

Each round runs, in each bundle in turn, what `edgelm bench` runs once per bundle: a generation
(the KV cache forgotten first) from POSITION random prompt tokens, ``--steps`` tokens past the
first one. The medians over the rounds are printed. `edgelm bench` measures one bundle after the
other, so a shared machine's drift (tens of percent here) can land on one row; in turns it lands on
every bundle alike. Used for the README's .pte attention comparison.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from edgelm.runtime import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("position", type=int, help="prompt length: decoding starts at this position")
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    engines = [Engine.load(b, threads=args.threads) for b in args.bundles]
    vocab = min(e.manifest.model.vocab_size for e in engines)
    prompt = np.random.default_rng(0).integers(100, vocab, args.position).tolist()
    prefill: dict[str, list[float]] = {b: [] for b in args.bundles}
    decode: dict[str, list[float]] = {b: [] for b in args.bundles}
    for _ in range(args.rounds):
        for name, engine in zip(args.bundles, engines):
            engine.reset()  # every round prefills the whole prompt
            for _tok in engine.generate_ids(prompt, max_new_tokens=args.steps + 1, ignore_eos=True):
                pass
            prefill[name].append(engine.last_stats.prefill_s)
            decode[name].append(engine.last_stats.decode_tps)
    for name in args.bundles:
        print(f"{name}: prefill of {args.position} tokens {statistics.median(prefill[name]) * 1e3:.0f} ms, "
              f"decode {statistics.median(decode[name]):.1f} tok/s "
              f"(rounds {min(decode[name]):.1f}-{max(decode[name]):.1f})")


if __name__ == "__main__":
    main()
