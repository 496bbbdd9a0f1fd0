"""The PyTorch eager baseline: ``transformers`` ``generate`` on the source model, fp32.

Timed with a streamer that stamps every token as ``generate`` emits it, so the figures
mean the same as the runtime's: time to first token, prefill and decode tokens/s.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from edgelm.bench import DEFAULT_PROMPT, _summary, peak_rss_mb, sampling_label


class _Stamps:
    """A transformers streamer that records when each chunk of tokens arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def bench_eager(source: str | None = None, prompt: str = DEFAULT_PROMPT, new_tokens: int = 64, runs: int = 5,
                warmup: int = 1, threads: int | None = None, chat: bool = True,
                sampling: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time ``transformers`` generation of exactly ``new_tokens`` tokens: greedy, or sampled with
    ``sampling``'s :class:`~edgelm.sampling.SamplingConfig` fields (transformers' own warpers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgelm.converters.sources import embedded_default_path

    if threads:
        torch.set_num_threads(threads)
    kwargs: dict[str, Any] = {}
    path = source
    if source is None:
        p = embedded_default_path()
        path, kwargs = str(p.parent), {"gguf_file": p.name}
    elif source.endswith(".gguf"):
        from pathlib import Path

        path, kwargs = str(Path(source).parent), {"gguf_file": Path(source).name}
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    if chat and tok.chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tok(prompt)["input_ids"]
    inp = torch.tensor([list(ids)])
    how: dict[str, Any] = {"do_sample": False}
    if sampling and sampling.get("temperature"):
        how = {"do_sample": True, "temperature": sampling["temperature"], "top_k": sampling.get("top_k", 0),
               "top_p": sampling.get("top_p", 1.0), "repetition_penalty": sampling.get("repetition_penalty", 1.0)}
    samples: dict[str, list[float]] = {"ttft_s": [], "prefill_tps": [], "decode_tps": []}
    tokens: list[int] = []
    for i in range(warmup + runs):
        stamps = _Stamps()
        if sampling and sampling.get("seed") is not None:
            torch.manual_seed(sampling["seed"])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, streamer=stamps, pad_token_id=0, **how)
        tokens = tokens or out[0, inp.shape[1]:].tolist()
        # stamps[0] is the prompt being put, stamps[1] the first new token, then one per token
        first, last = stamps.times[1], stamps.times[-1]
        if i >= warmup:
            samples["ttft_s"].append(first - t0)
            samples["prefill_tps"].append(inp.shape[1] / (first - t0))
            samples["decode_tps"].append((len(stamps.times) - 2) / (last - first))
    return {"name": "pytorch eager fp32" + sampling_label(sampling), "kind": "eager", "source": source or "embedded",
            "threads": threads, "prompt_tokens": inp.shape[1], "new_tokens": new_tokens, "runs": runs,
            "warmup": warmup, **{k: _summary(v) for k, v in samples.items()}, "peak_rss_mb": peak_rss_mb(),
            "size_mb": None, "tokens": tokens}
