"""Time to first token of each turn of a conversation, with the KV cache kept between turns
(what ``Engine.chat`` and ``edgelm chat`` do) against a full prefill of the conversation.

    python scripts/chat_bench.py BUNDLE [--threads 2] [--runs 3] [--max-new-tokens 64]

Both runs hold the same greedy conversation: the script checks that the answers agree and
prints, per turn, the prompt length, the tokens found in the cache and the median time to
first token of each run (medians of ``--runs`` conversations).
"""

from __future__ import annotations

import argparse
import statistics

from edgelm.runtime import Engine

TURNS = [
    "I'm planning a trip to Japan in spring. Which cities should I visit?",
    "How many days should I spend in Kyoto?",
    "What food should I try there?",
    "Is it expensive to travel around by train?",
    "Summarize the plan in three short bullet points.",
]


def conversation(engine: Engine, keep_cache: bool, max_new_tokens: int) -> list[dict]:
    chat = engine.chat()
    engine.reset()
    turns = []
    for text in TURNS:
        if not keep_cache:
            engine.reset()
        answer = chat.ask(text, max_new_tokens=max_new_tokens)
        s = engine.last_stats
        turns.append({"answer": answer, "prompt": s.prompt_tokens, "reused": s.reused_tokens, "ttft_s": s.ttft_s})
    return turns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    engine = Engine.load(args.bundle, threads=args.threads)
    conversation(engine, True, 8)  # warm-up
    runs = {keep: [conversation(engine, keep, args.max_new_tokens) for _ in range(args.runs)] for keep in (False, True)}
    full, kept = runs[False][0], runs[True][0]
    same = sum(a["answer"] == b["answer"] for a, b in zip(full, kept))
    m = engine.manifest
    print(f"{args.bundle} ({m.format}/{m.scheme}), {args.threads} threads, median of {args.runs} conversations; "
          f"answers equal in {same} of {len(TURNS)} turns")
    print("| turn | prompt tokens | in the cache | TTFT, full prefill | TTFT, cache kept | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i in range(len(TURNS)):
        a = statistics.median(r[i]["ttft_s"] for r in runs[False])
        b = statistics.median(r[i]["ttft_s"] for r in runs[True])
        print(f"| {i + 1} | {kept[i]['prompt']} | {kept[i]['reused']} | {a * 1e3:.0f} ms | {b * 1e3:.0f} ms | "
              f"{a / b:.1f}x |")


if __name__ == "__main__":
    main()
