"""Integration: the real SmolLM2-135M-Instruct, lowered and run in the real runtimes,
against transformers' own greedy generation."""

from __future__ import annotations

import pytest
import torch

from edgelm.runtime import Engine

from .conftest import SMOLLM2_PREFILL, requires_smollm2

pytestmark = [pytest.mark.integration, requires_smollm2]

PROMPTS = [
    ("chat", "Write a short story about a robot who learns to paint."),
    ("chat", "Explain how a refrigerator works, step by step."),
    ("raw", "The history of the printing press begins"),
    # longer than the prefill chunk, so the prompt is prefilled in several calls
    ("chat", "Read these notes and then write a detailed, multi-paragraph essay based on them. Notes: "
             "Oceans cover about seventy percent of the surface of the Earth. They hold most of the water on the "
             "planet and shape the weather and the climate. Currents move warm water from the equator toward the "
             "poles and cold water back again. Tiny plants called phytoplankton produce a large share of the oxygen "
             "we breathe. Coral reefs are home to a quarter of all marine species, yet they are threatened by "
             "warming water and pollution. People depend on the ocean for food, trade, transport and energy. "
             "Essay:"),
]
NEW_TOKENS = 48


def hf_greedy(hf_model, ids: list[int], eos: frozenset[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, do_sample=False, eos_token_id=sorted(eos), pad_token_id=0)
    gen = out[0, len(ids):].tolist()
    return [t for t in gen if t not in eos][:n]


def check_matches_transformers(bundle, hf_smollm2, draft=None):
    hf_model, hf_tok = hf_smollm2
    engine = Engine.load(bundle, threads=2, draft=draft)
    longest = 0
    for kind, prompt in PROMPTS:
        ids = engine.encode_prompt(prompt, chat=kind == "chat")
        longest = max(longest, len(ids))
        # the bundle's tokenizer and chat template reproduce transformers' exactly
        if kind == "chat":
            want_ids = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)
            want_ids = want_ids["input_ids"] if isinstance(want_ids, dict) else list(want_ids)
        else:
            want_ids = hf_tok(prompt)["input_ids"]
        assert ids == list(want_ids)
        got = list(engine.generate_ids(ids, max_new_tokens=NEW_TOKENS))
        want = hf_greedy(hf_model, ids, engine.eos_ids, NEW_TOKENS)
        assert got == want, (prompt, engine.tokenizer.decode(got), hf_tok.decode(want))
        assert len(got) == NEW_TOKENS, f"stopped early on {prompt!r}; pick a prompt with a longer answer"
    assert longest > engine.backend.max_prefill == SMOLLM2_PREFILL  # one prompt was prefilled in chunks
    return engine


@pytest.mark.parametrize("fmt", ["pte", "onnx", "tflite"])
def test_greedy_matches_transformers(fmt, smollm2_bundles, hf_smollm2):
    check_matches_transformers(smollm2_bundles(fmt), hf_smollm2)


def test_speculative_pte_matches_transformers(smollm2_bundles, hf_smollm2):
    """The fp32 .pte checking an ONNX draft's tokens still gives transformers' greedy tokens."""
    engine = check_matches_transformers(smollm2_bundles("pte"), hf_smollm2, draft=smollm2_bundles("onnx"))
    s = engine.last_stats
    assert s.draft_tokens >= 10 and s.acceptance > 0.9  # an fp32 draft of the same model agrees almost always


def test_pte_chat_answer_is_sensible(smollm2_pte):
    engine = Engine.load(smollm2_pte, threads=2)
    answer = engine.complete("What is the capital of France?", chat=True, max_new_tokens=32)
    assert "Paris" in answer
    assert engine.last_stats.stop_reason == "eos"
    assert engine.last_stats.decode_tps > 0


def test_chat_turns_match_transformers(smollm2_pte, hf_smollm2):
    """The second turn runs from the KV cache the first left and still answers as transformers does
    on the whole conversation."""
    hf_model, hf_tok = hf_smollm2
    engine = Engine.load(smollm2_pte, threads=2)
    chat = engine.chat(system="You are a geography teacher.")
    first = chat.ask("What is the capital of France?", max_new_tokens=24)
    first_prompt = engine.last_stats.prompt_tokens
    second = chat.ask("Which river flows through it?", max_new_tokens=24)
    assert engine.last_stats.reused_tokens >= first_prompt + 5  # the first turn's prompt and most of its answer
    messages = chat.conversation()[:-1]
    assert messages[2] == {"role": "assistant", "content": first}
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = ids["input_ids"] if isinstance(ids, dict) else list(ids)
    assert engine.encode_prompt(messages) == ids
    want = hf_greedy(hf_model, ids, engine.eos_ids, 24)
    assert second == engine.tokenizer.decode(want)


def test_eager_baseline_samples_when_asked():
    """`edgelm bench --eager --temperature ...`: the eager row samples with transformers' warpers
    (seeded, so twice the same), and greedy is greedy."""
    from edgelm.converters.baseline import bench_eager

    kw = {"new_tokens": 12, "runs": 1, "warmup": 0, "threads": 2}
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 0.95, "seed": 3}
    greedy = bench_eager(**kw)
    sampled = [bench_eager(**kw, sampling=sampling) for _ in range(2)]
    assert greedy["name"] == "pytorch eager fp32"
    assert sampled[0]["name"] == "pytorch eager fp32, sampled (temperature 1, top-p 0.95)"
    assert sampled[0]["tokens"] == sampled[1]["tokens"] != greedy["tokens"]
    assert len(greedy["tokens"]) == 12 and sampled[0]["decode_tps"]["median"] > 0


def test_pte_bundle_stores_tied_embedding_once(smollm2_pte, smollm2_source):
    cfg = smollm2_source.config
    assert cfg.tie_embeddings
    fp32_bytes = cfg.num_parameters() * 4
    size = sum(p.stat().st_size for p in smollm2_pte.iterdir() if p.suffix in (".pte", ".ptd"))
    embedding = cfg.vocab_size * cfg.dim * 4
    assert size < fp32_bytes + embedding / 4, (size, fp32_bytes)


def test_canonical_decoder_matches_transformers_logits(smollm2_source, hf_smollm2):
    from edgelm.converters.model import build_decoder

    hf_model, _ = hf_smollm2
    model = build_decoder(smollm2_source.config, smollm2_source.state_dict)
    model.full_logits = True
    ids = torch.randint(0, smollm2_source.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_model(ids).logits
        got, _ = model(ids, torch.tensor([0]), model.empty_caches())
    assert (ref - got).abs().max().item() < 1e-3
