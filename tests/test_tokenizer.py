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


# What recent templates use (Qwen3-style): a namespace scanned over the reversed history, string
# methods, `is string`, tojson of non-ASCII text with "<" in it, a {% generation %} block, and a
# variable the caller passes (enable_thinking).
RICH_TEMPLATE = """{%- set ns = namespace(last_user=-1) %}
{%- for m in messages[::-1] %}{% if ns.last_user < 0 and m.role == 'user' %}{% set ns.last_user = \
(messages|length - 1) - loop.index0 %}{% endif %}{% endfor %}
{%- for m in messages %}
{%- set content = m.content if m.content is string else '' %}
{%- if m.role == 'assistant' %}<|im_start|>assistant
{% generation %}{{ content.split('</think>')[-1].lstrip('\\n') }}{% endgeneration %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}{{ ' (last)' if loop.index0 == ns.last_user }}
{{ content.strip() }}{% if m.meta is defined %} {{ m.meta | tojson }}{% endif %}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""


@pytest.mark.parametrize("variables", [{}, {"enable_thinking": False}, {"enable_thinking": True}])
def test_rich_chat_templates_render_as_transformers_does(tok, tmp_path, variables):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<|im_end|>")
    hf.chat_template = tok.chat_template = RICH_TEMPLATE
    msgs = [{"role": "user", "content": "  héllo  ", "meta": {"note": "<b>日本</b> & 'x'"}},
            {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nhi there"},
            {"role": "user", "content": "and now?"}]
    want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **variables)
    assert tok.apply_chat_template(msgs, **variables) == want
    assert '"<b>日本</b> & \'x\'"' in want and ("<think>" in want) == (variables == {"enable_thinking": False})
    assert tok.encode_chat(msgs, **variables) == tok.encode(want, add_special_tokens=False)


def test_missing_template_and_bad_file(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text(tiny_tokenizer_json())
    with pytest.raises(BundleError, match="no chat template"):
        Tokenizer(p).apply_chat_template([{"role": "user", "content": "x"}])
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(BundleError, match="cannot load tokenizer"):
        Tokenizer(bad)
