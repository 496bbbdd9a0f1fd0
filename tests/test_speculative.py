"""Speculative decoding: a draft bundle (or prompt lookup) proposes, the target (.pte or .onnx) checks in one
verify pass."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgelm.errors import BundleError
from edgelm.runtime import Engine, SamplingConfig
from edgelm.runtime.drafting import FIRST_LOOKUP_LENGTH, LookupDrafter
from edgelm.sampling import Sampler

from .conftest import TINY, convert_bundle
from .test_cli import assert_clean_error, edgelm

PROMPTS = ["the cat", "a b c d e f", "hello world this is", "z" * 40]  # the last one is prefilled in chunks


def _smaller_tiny(root, fmt: str):
    """A different model with the same tokenizer: the tiny one with a block dropped.

    It disagrees with the target often, so both the accepting and the rejecting paths run.
    """
    from edgelm.converters.compress.options import CompressOptions

    return convert_bundle(root / f"tiny-draft-{fmt}", TINY, fmt=fmt, max_prefill=16,
                          compress=CompressOptions(drop_layers=1), min_top1=0.0, max_logit_error=1e9)


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    """An ONNX draft (any format can propose tokens)."""
    return _smaller_tiny(tmp_path_factory.mktemp("draft"), "onnx")


@pytest.fixture(scope="module")
def pte_draft(tmp_path_factory):
    """A .pte draft: the target's and the draft's ExecuTorch programs share one process."""
    return _smaller_tiny(tmp_path_factory.mktemp("draft"), "pte")


@pytest.fixture(scope="module")
def plain(tiny_pte):
    return Engine.load(tiny_pte, threads=1)


@pytest.fixture(scope="module")
def onnx_target(tmp_path_factory):
    """The tiny model as an ONNX bundle: its graph returns the logits of the positions it is asked for."""
    return convert_bundle(tmp_path_factory.mktemp("target") / "tiny-onnx", TINY, fmt="onnx", max_prefill=16)


@pytest.mark.parametrize("fmt", ["pte", "onnx"])
def test_verify_rows_are_the_decode_steps_rows(tiny_pte, onnx_target, fmt):
    """One verify call gives, position by position, the logits that one decode step per token gives."""
    bundle = tiny_pte if fmt == "pte" else onnx_target
    a, b = Engine.load(bundle, threads=1), Engine.load(bundle, threads=1)
    ids = a.encode_prompt("check these tokens in one pass")
    head, tail = np.asarray(ids[:9]), ids[9:15]
    a.backend.prefill(head, 0)
    b.backend.prefill(head, 0)
    rows = a.backend.verify(np.asarray(tail), len(head))
    steps = np.stack([b.backend.decode(t, len(head) + i) for i, t in enumerate(tail)])
    assert rows.shape == (len(tail), a.manifest.model.vocab_size)
    assert np.abs(rows - steps).max() < 1e-4
    # and the cache rows verify wrote are the ones decoding goes on from
    assert np.abs(a.backend.decode(ids[15], 15) - b.backend.decode(ids[15], 15)).max() < 1e-4


def test_an_onnx_target_gives_its_own_tokens(onnx_target, pte_draft):
    plain_onnx = Engine.load(onnx_target, threads=1)
    with_draft = Engine.load(onnx_target, threads=1, draft=pte_draft, draft_tokens=4)
    with_lookup = Engine.load(onnx_target, threads=1, lookup=3)
    drafted = accepted = looked_up = 0
    for prompt in [*PROMPTS, "one two three one two three one two three one two"]:
        ids = plain_onnx.encode_prompt(prompt)
        want = list(plain_onnx.generate_ids(ids, max_new_tokens=40, ignore_eos=True))
        assert list(with_draft.generate_ids(ids, max_new_tokens=40, ignore_eos=True)) == want, prompt
        stats = with_draft.last_stats
        drafted, accepted = drafted + stats.draft_tokens, accepted + stats.accepted_tokens
        assert list(with_lookup.generate_ids(ids, max_new_tokens=40, ignore_eos=True)) == want, prompt
        looked_up += with_lookup.last_stats.draft_tokens
    assert 0 < accepted < drafted and looked_up > 0


@pytest.fixture(scope="module")
def old_onnx(onnx_target, tmp_path_factory):
    """The ONNX bundle as edgelm wrote it before ``logits_to_keep``: the graph computes the last
    position's index itself and returns logits ``[1, vocab]``."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    from edgelm.bundle import sha256_file

    out = tmp_path_factory.mktemp("old") / "old-onnx"
    shutil.copytree(onnx_target, out)
    m = onnx.load(str(out / "model.onnx"))
    g = m.graph
    keep = next(v for v in g.input if v.name == "logits_to_keep")
    g.input.remove(keep)
    g.initializer.append(helper.make_tensor("one_", TensorProto.INT64, [1], [1]))
    last = [helper.make_node("Shape", ["input_ids"], ["seq_"], start=1, end=2),
            helper.make_node("Sub", ["seq_", "one_"], ["last_"])]
    for node in g.node:
        node.input[:] = ["last_" if x == "logits_to_keep" else x for x in node.input]
        node.output[:] = ["logits_3d_" if x == "logits" else x for x in node.output]
    g.node.insert(0, last[1])
    g.node.insert(0, last[0])
    g.initializer.append(helper.make_tensor("axis_", TensorProto.INT64, [1], [1]))
    g.node.append(helper.make_node("Squeeze", ["logits_3d_", "axis_"], ["logits"]))
    logits = next(v for v in g.output if v.name == "logits")
    vocab = logits.type.tensor_type.shape.dim[2].dim_value
    logits.CopyFrom(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, vocab]))
    onnx.save(m, str(out / "model.onnx"))
    manifest = json.loads((out / "edgelm.json").read_text())
    del manifest["io"]["max_verify"], manifest["io"]["inputs"]["logits_to_keep"]
    manifest["files"]["model.onnx"] = {"sha256": sha256_file(out / "model.onnx"),
                                       "size": (out / "model.onnx").stat().st_size}
    (out / "edgelm.json").write_text(json.dumps(manifest))
    return out


def test_an_onnx_bundle_from_before_logits_to_keep_runs_but_cannot_check_drafts(onnx_target, old_onnx):
    engine, new = Engine.load(old_onnx, threads=1), Engine.load(onnx_target, threads=1)
    assert engine.backend.max_verify == 0
    ids = new.encode_prompt("z" * 40)  # prefilled in chunks, then decoded
    assert list(engine.generate_ids(ids, max_new_tokens=20, ignore_eos=True)) == \
        list(new.generate_ids(ids, max_new_tokens=20, ignore_eos=True))
    with pytest.raises(BundleError, match="no verify method"):
        engine.attach_lookup()
    with pytest.raises(BundleError, match="predates speculative decoding"):
        engine.backend.verify(np.asarray(ids[:3]), 0)


@pytest.mark.parametrize("draft_tokens", [1, 4, 15])
def test_greedy_output_is_the_targets_own(plain, tiny_pte, draft, draft_tokens):
    spec = Engine.load(tiny_pte, threads=1, draft=draft, draft_tokens=draft_tokens)
    drafted = accepted = 0
    for prompt in PROMPTS:
        ids = plain.encode_prompt(prompt)
        want = list(plain.generate_ids(ids, max_new_tokens=40, ignore_eos=True))
        got = list(spec.generate_ids(ids, max_new_tokens=40, ignore_eos=True))
        assert got == want, prompt
        s = spec.last_stats
        assert s.generated_tokens == 40 and s.decode_steps == 39 and s.decode_tps > 0
        drafted, accepted = drafted + s.draft_tokens, accepted + s.accepted_tokens
    assert 0 < accepted < drafted  # drafts were both kept and thrown away


def test_a_pte_draft_gives_the_same_tokens(plain, tiny_pte, pte_draft):
    spec = Engine.load(tiny_pte, threads=1, draft=pte_draft, draft_tokens=3)
    drafted = accepted = 0
    for prompt in PROMPTS:
        ids = plain.encode_prompt(prompt)
        want = list(plain.generate_ids(ids, max_new_tokens=40, ignore_eos=True))
        assert list(spec.generate_ids(ids, max_new_tokens=40, ignore_eos=True)) == want, prompt
        drafted, accepted = drafted + spec.last_stats.draft_tokens, accepted + spec.last_stats.accepted_tokens
    assert 0 < accepted < drafted


def test_a_draft_identical_to_the_target_is_always_accepted(plain, tiny_pte):
    """verify's logits agree with decode's, so the target's own model as draft loses nothing."""
    spec = Engine.load(tiny_pte, threads=1, draft=tiny_pte, draft_tokens=4)
    ids = plain.encode_prompt("identical")
    want = list(plain.generate_ids(ids, max_new_tokens=30, ignore_eos=True))
    assert list(spec.generate_ids(ids, max_new_tokens=30, ignore_eos=True)) == want
    s = spec.last_stats
    assert s.draft_tokens > 0 and s.acceptance == 1.0


def test_token_budget_eos_and_context_end(plain, tiny_pte, draft):
    spec = Engine.load(tiny_pte, threads=1, draft=draft, draft_tokens=6)
    ids = plain.encode_prompt("budget")
    for n in (1, 2, 7):
        assert len(list(spec.generate_ids(ids, max_new_tokens=n, ignore_eos=True))) == n
    # stops at EOS exactly where plain decoding does (generate() without ignore_eos)
    for prompt in PROMPTS:
        assert spec.complete(prompt, max_new_tokens=60) == plain.complete(prompt, max_new_tokens=60)
        assert spec.last_stats.stop_reason == plain.last_stats.stop_reason
    # near the end of the window the draft runs shrink, then plain steps finish the job
    ctx = plain.max_context
    long = [65 + i % 26 for i in range(ctx - 12)]
    want = list(plain.generate_ids(long, max_new_tokens=40, ignore_eos=True))
    got = list(spec.generate_ids(long, max_new_tokens=40, ignore_eos=True))
    assert got == want and spec.last_stats.stop_reason == plain.last_stats.stop_reason == "context_full"


def test_sampling_with_a_draft_is_seeded(tiny_pte, draft):
    spec = Engine.load(tiny_pte, threads=1, draft=draft, draft_tokens=4)
    cfg = SamplingConfig(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=7)
    a = spec.complete("seeded", max_new_tokens=24, sampling=cfg)
    b = spec.complete("seeded", max_new_tokens=24, sampling=cfg)
    assert a == b and spec.last_stats.draft_tokens > 0


@pytest.mark.parametrize("one_hot", [False, True])  # True: prompt lookup's sure proposals
def test_accept_draft_keeps_the_target_distribution(one_hot):
    """Draw from q, test against p: what comes out must be distributed as p, not q."""
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    if one_hot:
        q = np.eye(6)[int(np.argmin(p))]
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=1))
    n = 40_000
    counts = np.zeros(6)
    for _ in range(n):
        x = sampler.draw(q)
        counts[sampler.accept_draft(p, q, x)[1]] += 1
    assert 0.5 * np.abs(counts / n - p).sum() < 0.015
    assert 0.5 * np.abs(p - q).sum() > 0.1  # the test would notice the draft's distribution leaking through


def test_bad_pairs_are_refused(tiny_pte, draft):
    target, other = Engine.load(tiny_pte, threads=1), Engine.load(draft, threads=1)
    other.manifest.files[other.manifest.tokenizer_file]["sha256"] = "0" * 64
    with pytest.raises(BundleError, match="another tokenizer"):
        target.attach_draft(other)
    with pytest.raises(ValueError, match="at least 1"):
        target.attach_draft(Engine.load(tiny_pte, threads=1), draft_tokens=0)


def test_cli_run_and_bench_with_a_draft(tiny_pte, draft, tmp_path):
    proc = edgelm("run", tiny_pte, "hello", "-n", "12", "--draft", draft, "--draft-tokens", "3", "--stats",
                  check=True)
    plain = edgelm("run", tiny_pte, "hello", "-n", "12", check=True)
    assert proc.stdout == plain.stdout and "draft tokens accepted" in proc.stderr
    out = edgelm("bench", tiny_pte, "--draft", draft, "--runs", "1", "--warmup", "0", "-n", "6", "--threads", "1",
                 "--json", "-", check=True)
    rows = json.loads(out.stdout)["rows"]
    assert rows[0]["name"] == "edgelm pte fp32" and "acceptance" not in rows[0]
    assert rows[1]["name"].startswith("edgelm pte fp32 + draft onnx fp32 (compressed to ")
    assert rows[1]["name"].endswith(" (speculative, 5 tokens)")
    assert rows[1]["size_mb"] > rows[0]["size_mb"] and 0 <= rows[1]["acceptance"]["median"] <= 1
    assert_clean_error(edgelm("run", tiny_pte, "hello", "--draft", tmp_path / "nothing-here"), "nothing-here")



def test_a_second_program_keeps_the_shared_thread_pool(plain, pte_draft):
    """ExecuTorch has one thread pool per process; resizing it under a loaded program crashed that program."""
    other = Engine.load(pte_draft, threads=plain.backend.threads + 1)
    assert other.backend.threads == plain.backend.threads
    ids = plain.encode_prompt("still alive")
    assert len(list(plain.generate_ids(ids, max_new_tokens=5, ignore_eos=True))) == 5
    assert len(list(other.generate_ids(ids, max_new_tokens=5, ignore_eos=True))) == 5


def test_pte_prefill_and_decode_delegate_alike(tiny_pte):
    """No reshape by the symbolic sequence length: prefill is one XNNPACK partition per layer span, like
    decode (it was 7 per layer), and decode takes up to 16 tokens."""
    m = json.loads((tiny_pte / "edgelm.json").read_text())
    d = m["verification"]["lowering"]["delegation"]
    assert d["prefill"]["delegates"] <= d["decode"]["delegates"] + 1
    assert d["prefill"]["not_delegated"] <= d["decode"]["not_delegated"] + 8
    assert m["io"]["max_verify"] == 16 and m["io"]["methods"] == ["prefill", "decode"]


def _brute_lookup(history, k, max_ngram=3, min_ngram=2):
    for n in range(min(max_ngram, len(history) - 1), min_ngram - 1, -1):
        starts = [i for i in range(len(history) - n) if history[i:i + n] == history[-n:]]
        if starts:
            return history[starts[-1] + n:starts[-1] + n + k]
    return []


def test_lookup_finds_the_latest_longest_ngram():
    #        0  1  2  3  4  5  6  7  8  9 10 11
    hist = [1, 2, 3, 9, 8, 2, 3, 7, 6, 1, 2, 3]
    # [2, 3] recurs at 1 and 5, but the trigram [1, 2, 3] (at 0) wins
    assert LookupDrafter().lookup(hist, 4) == [9, 8, 2, 3]
    # only the bigram recurs: its latest occurrence
    assert LookupDrafter().lookup(hist[:-1] + [4, 2, 3], 2) == [7, 6]
    assert LookupDrafter().lookup([5, 6, 7, 8, 6], 4) == []  # a lone token is not looked up (min_ngram 2)
    assert LookupDrafter(3, 1).lookup([5, 6, 7, 8, 6], 4) == [7, 8, 6]
    assert LookupDrafter().lookup([4, 4], 3) == [] and LookupDrafter().lookup([4, 4, 4], 3) == [4]
    with pytest.raises(ValueError, match="min_ngram"):
        LookupDrafter(2, 3)


def test_lookup_as_the_history_grows_equals_a_fresh_scan():
    """The drafter indexes the history as it grows (one or several tokens a step, as accepted runs
    come); every answer must be the one a scan of the whole history gives."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        d = LookupDrafter()
        d.start([])
        hist = rng.integers(0, 6, size=5).tolist()
        while len(hist) < 120:
            assert d.lookup(hist, 5) == _brute_lookup(hist, 5), (trial, hist)
            hist += rng.integers(0, 6, size=int(rng.integers(1, 5))).tolist()


def test_lookup_proposals_start_short_shrink_after_rejections_and_grow_back():
    d = LookupDrafter()
    greedy = Sampler(SamplingConfig())
    hist = list(range(20)) * 2 + [0, 1]  # every tail recurs, with 18 tokens after it
    assert len(d.propose(1, 0, 8, hist, greedy)[0]) == FIRST_LOOKUP_LENGTH == 2
    for n in (2, 4, 6, 8):  # every run accepted: two more each time, up to what the engine allows
        drafts = d.propose(1, 0, 8, hist, greedy)[0]
        assert len(drafts) == n
        d.settle(drafts, n)
    d.settle([0] * 8, 3)
    d.settle([0] * 7, 0)
    assert len(d.propose(1, 0, 8, hist, greedy)[0]) == 6
    assert len(d.propose(1, 0, 3, hist, greedy)[0]) == 3
    d.start([])
    assert len(d.propose(1, 0, 8, hist, greedy)[0]) == 2


@pytest.fixture(scope="module")
def lookup(tiny_pte):
    return Engine.load(tiny_pte, threads=1, lookup=3)


def test_prompt_lookup_gives_the_targets_own_tokens(plain, lookup):
    """The tiny random model repeats itself and its prompt: proposals are both kept and thrown away."""
    drafted = accepted = 0
    for prompt in [*PROMPTS, "one two three one two three one two", "abcabcabcabcabc"]:
        ids = plain.encode_prompt(prompt)
        want = list(plain.generate_ids(ids, max_new_tokens=48, ignore_eos=True))
        assert list(lookup.generate_ids(ids, max_new_tokens=48, ignore_eos=True)) == want
        drafted += lookup.last_stats.draft_tokens
        accepted += lookup.last_stats.accepted_tokens
        assert lookup.complete(prompt, max_new_tokens=60) == plain.complete(prompt, max_new_tokens=60)
        assert lookup.last_stats.stop_reason == plain.last_stats.stop_reason
    assert 0 < accepted < drafted
    long = [65 + i % 26 for i in range(plain.max_context - 12)]  # recurs everywhere, up to the window's end
    want = list(plain.generate_ids(long, max_new_tokens=40, ignore_eos=True))
    assert list(lookup.generate_ids(long, max_new_tokens=40, ignore_eos=True)) == want
    assert lookup.last_stats.stop_reason == "context_full" and lookup.last_stats.accepted_tokens > 0


def test_sampling_with_prompt_lookup_is_seeded(lookup):
    cfg = SamplingConfig(temperature=0.3, top_k=50, seed=3)  # cool enough for the random model to repeat itself
    prompt = "one two three one two three one two"
    a = lookup.complete(prompt, max_new_tokens=48, sampling=cfg)
    assert a == lookup.complete(prompt, max_new_tokens=48, sampling=cfg)
    assert 0 < lookup.last_stats.accepted_tokens < lookup.last_stats.draft_tokens


def test_cli_run_and_bench_with_prompt_lookup(tiny_pte, draft, old_onnx):
    prompt = "one two three one two three one two"
    proc = edgelm("run", tiny_pte, prompt, "-n", "24", "--lookup", "--stats", check=True)
    assert proc.stdout == edgelm("run", tiny_pte, prompt, "-n", "24", check=True).stdout
    assert "draft tokens accepted" in proc.stderr
    out = edgelm("bench", tiny_pte, "--lookup", "--runs", "1", "--warmup", "0", "-n", "6", "--threads", "1",
                 "--json", "-", check=True)
    rows = json.loads(out.stdout)["rows"]
    assert [r["name"] for r in rows] == ["edgelm pte fp32",
                                         "edgelm pte fp32 + prompt lookup (speculative, up to 5 tokens)"]
    assert rows[1]["lookup"] == 3 and rows[1]["size_mb"] == rows[0]["size_mb"]
    assert_clean_error(edgelm("run", tiny_pte, "hi", "--lookup", "--draft", draft), "give one")
    assert_clean_error(edgelm("run", old_onnx, "hi", "--lookup"), "no verify method")
    assert "one token per call: not a target for --draft or --lookup (convert it again to make it one)" in \
        edgelm("inspect", old_onnx, check=True).stdout
    assert "up to 16 tokens checked per call: a target for --draft and --lookup" in \
        edgelm("inspect", tiny_pte, check=True).stdout


def test_one_source_of_proposals_at_a_time(tiny_pte, draft):
    with pytest.raises(ValueError, match="not both"):
        Engine.load(tiny_pte, threads=1, draft=draft, lookup=3)
    engine = Engine.load(tiny_pte, threads=1, draft=draft)
    engine.attach_lookup()
    assert (engine.draft, engine.lookup, engine.speculative) == (None, 3, True)
    engine.attach_draft(Engine.load(draft, threads=1), draft_tokens=2)
    assert engine.draft is not None and (engine.lookup, engine.draft_tokens) == (0, 2)
    engine.attach_lookup(0)
    assert (engine.draft, engine.lookup, engine.speculative) == (None, 0, False)

