from __future__ import annotations

import pytest

from edgelm.converters.sources import TINY_CHAT_TEMPLATE, tiny_tokenizer_json
from edgelm.errors import BundleError
from edgelm.tokenizer import Tokenizer


@pytest.fixture()
def tok(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text(tiny_tokenizer_json())
    return Tokenizer(p, {"eos_token": "<|im_end|>", "eos_token_ids": [256]}, TINY_CHAT_TEMPLATE)


def test_incremental_detokenization_is_utf8_safe(tok):
    text = "héllo wörld — 日本語 🙂 done"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # byte-level: multi-byte characters span several tokens
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_chat_template_matches_transformers(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<|im_end|>")
    hf.chat_template = TINY_CHAT_TEMPLATE
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.encode_chat(msgs)[:1] == [tok.token_to_id("<|im_start|>")]


def test_missing_template_and_bad_file(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text(tiny_tokenizer_json())
    with pytest.raises(BundleError, match="no chat template"):
        Tokenizer(p).apply_chat_template([{"role": "user", "content": "x"}])
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(BundleError, match="cannot load tokenizer"):
        Tokenizer(bad)
