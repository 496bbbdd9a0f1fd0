"""Print a long prompt for timing a bundle deep into its context.

    edgelm bench BUNDLE --runs 3 --prompt "$(python scripts/long_prompt.py BUNDLE 3300)"

edgelm's built-in held-out text, then its calibration text, cut at N tokens of the bundle's tokenizer,
then a request for a summary. The chat template and the request add a few tokens more.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer

DATA = Path(__file__).resolve().parents[1] / "converters" / "data"
REQUEST = "\n\nSummarize the text above in three sentences."


def long_prompt(tokens: int, tokenizer: Tokenizer) -> str:
    """The built-in texts cut at ``tokens`` tokens, then the request."""
    text = (DATA / "heldout.txt").read_text(encoding="utf-8") + "\n" + (DATA / "calibration.txt").read_text(
        encoding="utf-8")
    ids = tokenizer.encode(text).ids
    if len(ids) < tokens:
        raise SystemExit(f"the built-in texts have {len(ids)} tokens; ask for at most that many")
    return tokenizer.decode(ids[:tokens]) + REQUEST


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, help="a bundle: its tokenizer.json counts the tokens")
    ap.add_argument("tokens", type=int)
    args = ap.parse_args()
    if not (args.bundle / "tokenizer.json").is_file():
        raise SystemExit(f"{args.bundle} has no tokenizer.json; pass an edgelm bundle")
    print(long_prompt(args.tokens, Tokenizer.from_file(str(args.bundle / "tokenizer.json"))))


if __name__ == "__main__":
    main()
