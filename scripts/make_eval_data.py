"""Make the built-in calibration and held-out evaluation text (committed under converters/data/).

The text is written by the fp32 model itself (an fp32 bundle of the embedded SmolLM2),
sampled with fixed seeds from two disjoint prompt sets, so quantization is calibrated on
one set and judged on the other. Run:

    python scripts/make_eval_data.py BUNDLE [--tokens 160]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgelm.runtime import Engine, SamplingConfig

CALIBRATION_PROMPTS = [
    "Describe how bread is made, from flour to loaf.",
    "Tell a story about a fox who wants to fly.",
    "Explain what a computer network is to a child.",
    "Write a letter to a friend about a trip to the mountains.",
    "What are the main causes of the seasons on Earth?",
    "Give advice to someone starting to learn the guitar.",
    "Summarize the life cycle of a butterfly.",
    "Write a product description for a waterproof backpack.",
    "How do vaccines train the immune system?",
    "Describe a busy market in a coastal town.",
    "Explain the rules of chess in simple terms.",
    "Write a short speech for a school graduation.",
    "Why do cats purr? Give a few possible reasons.",
    "Describe the water cycle step by step.",
    "Write a recipe for a simple vegetable soup.",
    "What makes a good team leader?",
]
HELDOUT_PROMPTS = [
    "Explain how airplanes stay in the air.",
    "Write a story about a lost robot in a big city.",
    "Describe the history of the bicycle.",
    "What should someone pack for a week of camping?",
    "Explain photosynthesis to a curious teenager.",
    "Write a poem about winter mornings.",
    "How does a library organize its books?",
    "Describe the planets of the solar system.",
    "Give tips for writing a good essay.",
    "Tell a story about a dragon who is afraid of fire.",
    "How do bees make honey?",
    "Explain what inflation is and why it matters.",
    "Describe a day in the life of a lighthouse keeper.",
    "What are the benefits of learning a second language?",
    "Explain how a rainbow forms.",
    "Write a review of an imaginary restaurant.",
]


def generate(engine: Engine, prompts: list[str], tokens: int, seed: int) -> list[str]:
    out = []
    for i, prompt in enumerate(prompts):
        cfg = SamplingConfig(temperature=0.8, top_p=0.95, seed=seed + i)
        text = engine.complete(prompt, chat=True, max_new_tokens=tokens, sampling=cfg).strip()
        out.append(text.replace("\n\n", "\n"))
        print(f"[{i + 1}/{len(prompts)}] {len(text)} chars", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("bundle")
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "converters" / "data")
    args = ap.parse_args()
    engine = Engine.load(args.bundle)
    for name, prompts, seed in (("calibration", CALIBRATION_PROMPTS, 1000), ("heldout", HELDOUT_PROMPTS, 2000)):
        texts = generate(engine, prompts, args.tokens, seed)
        (args.out / f"{name}.txt").write_text("\n\n".join(texts) + "\n", encoding="utf-8")
        print(f"wrote {args.out / name}.txt")


if __name__ == "__main__":
    main()
