"""Prompt-prefix reuse (the KV cache outlives a generation) and multi-turn chat, on the tiny model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgelm.errors import BundleError, ContextOverflowError
from edgelm.runtime import Chat, Engine
from edgelm.runtime.prefix import RecordedBackend, common_prefix

from .test_speculative import pte_draft  # noqa: F401  (fixture)


def check_prefix_reuse(bundle, **load) -> None:
    """A second prompt that extends the first (prompt, answer, more text) runs only its new tokens
    and gives the tokens a fresh engine gives; so do a repeated and a diverging prompt."""
    warm, fresh = Engine.load(bundle, threads=1, **load), Engine.load(bundle, threads=1)
    first = warm.encode_prompt("the cat sat on", chat=True)
    out = list(warm.generate_ids(first, max_new_tokens=6, ignore_eos=True))
    assert warm.last_stats.reused_tokens == 0
    history = first + out
    # every token but the last answer token has run (the last one's row is written by the next step)
    assert common_prefix(warm.backend.tokens, history) >= len(history) - 1

    second = history + warm.tokenizer.encode(" and then the dog came")
    got = list(warm.generate_ids(second, max_new_tokens=8, ignore_eos=True))
    assert warm.last_stats.reused_tokens >= len(history) - 1
    assert warm.last_stats.prefill_tps > 0
    want = list(fresh.generate_ids(second, max_new_tokens=8, ignore_eos=True))
    assert fresh.last_stats.reused_tokens == 0
    assert got == want

    # the same prompt again: everything but its last token is in the cache
    assert list(warm.generate_ids(second, max_new_tokens=8, ignore_eos=True)) == want
    assert warm.last_stats.reused_tokens == len(second) - 1
    # a prompt that leaves the cached one early reuses the common part only
    third = second[:5] + warm.tokenizer.encode("zebra crossing")
    got = list(warm.generate_ids(third, max_new_tokens=8, ignore_eos=True))
    assert warm.last_stats.reused_tokens == 5
    assert got == list(fresh.generate_ids(third, max_new_tokens=8, ignore_eos=True))
    warm.reset()
    list(warm.generate_ids(third, max_new_tokens=2))
    assert warm.last_stats.reused_tokens == 0


def test_prefix_reuse_pte(tiny_pte):
    check_prefix_reuse(tiny_pte)


def test_prefix_reuse_with_prompt_lookup(tiny_pte):
    """Speculative passes write rows for draft tokens the target rejects; the record still tells the truth."""
    check_prefix_reuse(tiny_pte, lookup=3)


def test_prefix_reuse_with_a_draft_reuses_in_the_draft_too(tiny_pte, pte_draft):  # noqa: F811
    engine = Engine.load(tiny_pte, threads=1, draft=pte_draft)
    plain = Engine.load(tiny_pte, threads=1)
    draft_backend = engine.draft.backend.inner
    ran: list[int] = []
    prefill = draft_backend.prefill

    def counting_prefill(tokens, start_pos):
        ran.append(len(tokens))
        return prefill(tokens, start_pos)

    draft_backend.prefill = counting_prefill
    first = engine.encode_prompt("a b c d e f", chat=True)
    out = list(engine.generate_ids(first, max_new_tokens=10, ignore_eos=True))
    assert sum(ran) == len(first)
    second = first + out + engine.tokenizer.encode(" g h")
    ran.clear()
    got = list(engine.generate_ids(second, max_new_tokens=10, ignore_eos=True))
    assert got == list(plain.generate_ids(second, max_new_tokens=10, ignore_eos=True))
    assert engine.last_stats.reused_tokens >= len(first) + len(out) - 1
    assert sum(ran) <= len(second) - len(first)  # the draft ran the new tokens (and at most a few old ones)
    engine.reset()  # the draft forgets too
    assert engine.draft.backend.tokens == [] and engine.backend.tokens == []


class _Failing:
    """A backend whose calls write their rows and then fail (as an interrupted native call may)."""

    max_prefill, min_prefill = 8, 2

    def prefill(self, tokens, start_pos):
        raise RuntimeError("interrupted")

    def decode(self, token, pos):
        raise RuntimeError("interrupted")


def test_the_record_forgets_rows_a_failed_call_may_have_written():
    rec = RecordedBackend(_Failing())
    rec.tokens.extend([1, 2, 3, 4, 5])
    with pytest.raises(RuntimeError):
        rec.decode(9, 3)
    assert rec.tokens == [1, 2, 3]
    with pytest.raises(RuntimeError):
        rec.prefill(np.asarray([7, 8]), 1)
    assert rec.tokens == [1]
    assert rec.reusable([1, 2]) == 1 and rec.reusable([1]) == 0 and rec.reusable([]) == 0
    assert rec.max_prefill == 8  # the rest is the backend's


def test_chat_turns_reuse_the_conversation_and_answer_as_a_fresh_engine(tiny_pte):
    engine, fresh = Engine.load(tiny_pte, threads=1), Engine.load(tiny_pte, threads=1)
    chat = engine.chat(system="be brief")
    a1 = chat.ask("hi there", max_new_tokens=6)
    first_prompt = engine.last_stats.prompt_tokens
    a2 = chat.ask("and now?", max_new_tokens=6)
    assert engine.last_stats.reused_tokens >= first_prompt
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in chat.messages[1::2]] == [a1, a2]
    conversation = chat.conversation()
    assert conversation[0] == {"role": "system", "content": "be brief"}
    assert fresh.complete(conversation[:-1], max_new_tokens=6) == a2
    chat.reset()
    assert chat.messages == [] and chat.ask("hi there", max_new_tokens=6) == a1


def test_warming_runs_the_system_message_before_the_first_message(tiny_pte, pte_draft):  # noqa: F811
    engine = Engine.load(tiny_pte, threads=1, draft=pte_draft)
    chat = engine.chat(system="You answer in one short sentence, always.")
    ran = chat.warm()
    assert ran > 30 and chat.warm() == 0  # the second time the cache holds it all
    assert engine.draft.backend.tokens == engine.backend.tokens  # the draft was warmed too
    answer = chat.ask("hi", max_new_tokens=6)
    assert engine.last_stats.reused_tokens == ran
    assert answer == Engine.load(tiny_pte, threads=1).chat(system=chat.system).ask("hi", max_new_tokens=6)
    assert Chat(engine).warm() == 0  # nothing to run without a system message or turns


def test_chat_drops_the_oldest_turns_when_the_context_is_full(tiny_pte):
    engine = Engine.load(tiny_pte, threads=1)  # 128 tokens; the tokenizer is byte-level
    chat = Chat(engine)
    for i in range(6):
        chat.ask(f"message number {i}", max_new_tokens=12)
        prompt = engine.encode_prompt(chat.conversation()[:-1])
        assert len(prompt) <= engine.prompt_room(12)
        assert engine.last_stats.truncated_prompt_tokens == 0
    assert chat.dropped_turns > 0
    assert chat.messages[0]["role"] == "user" and chat.messages[-2]["content"] == "message number 5"
    with pytest.raises(ContextOverflowError):  # one message longer than the window
        chat.ask("x" * 200, max_new_tokens=4)
    assert chat.messages[-2]["content"] == "message number 5"  # the failed message was not added
    # a message that fits the window but leaves less room than asked: every older turn goes
    dropped = chat.dropped_turns
    chat.ask("w" * 105, max_new_tokens=12)
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] and chat.dropped_turns > dropped
    assert 116 < engine.last_stats.prompt_tokens < 128


def test_chat_needs_a_chat_template(tiny_pte):
    engine = Engine.load(tiny_pte, threads=1)
    engine.manifest.chat_template = None
    with pytest.raises(BundleError, match="no chat template"):
        engine.chat()


def _chat_cli(bundle, text: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelm.cli", "chat", str(bundle), *args], input=text,
                          capture_output=True, text=True, timeout=600)


def test_chat_command(tiny_pte):
    chat = Engine.load(tiny_pte, threads=1).chat()
    answers = [chat.ask("hello", max_new_tokens=5), chat.ask("second\nline", max_new_tokens=5)]
    proc = _chat_cli(tiny_pte, "hello\n/reset\nhello\nsecond\\\nline\n/exit\nnever read\n", "-n", "5", "--stats")
    assert proc.returncode == 0, proc.stderr
    # the same answer after /reset; the message ending in a backslash goes on on the next line
    assert proc.stdout == f"{answers[0]}\n{answers[0]}\n{answers[1]}\n"
    assert "a new conversation" in proc.stderr and proc.stderr.count("[pte/fp32] prompt") == 3
    assert "already in the KV cache" in proc.stderr
    proc = _chat_cli(tiny_pte, "hello\n" + "y" * 300 + "\nsecond\\\nline\n", "-n", "5")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "context window" in proc.stderr  # the long message fails; the conversation goes on without it
    assert proc.stdout == f"{answers[0]}\n{answers[1]}\n"


def test_chat_command_on_a_terminal(tiny_pte):
    """On a terminal (its controlling one, so Ctrl-C is a signal): a banner, a prompt for each
    message, Ctrl-C drops a half-typed line, Ctrl-D leaves with exit code 0."""
    import os
    import pty
    import select
    import signal
    import time

    pid, master = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal
        # as from a shell: Ctrl-C interrupts, whatever the test process did with SIGINT (exec keeps an ignored
        # or blocked signal so)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        os.execv(sys.executable, [sys.executable, "-m", "edgelm.cli", "chat", str(tiny_pte), "-n", "5"])
    seen, status = b"", None

    def read_until(count: int) -> None:
        nonlocal seen
        end = time.monotonic() + 300
        while seen.count(b"> ") < count:
            ready, _, _ = select.select([master], [], [], max(0.0, end - time.monotonic()))
            assert ready, seen
            seen += os.read(master, 4096)

    try:
        read_until(1)
        os.write(master, b"hello\n")
        read_until(2)  # the answer streamed and the next prompt came
        # as a person types, not within microseconds of the prompt: Python's readline prints the prompt before it
        # waits for input, and a SIGINT that lands in between is only noticed on the next key (a hang, seen once
        # on a loaded machine)
        time.sleep(1.0)
        os.write(master, b"half a line\x03")  # Ctrl-C drops it and prompts again
        read_until(3)
        os.write(master, b"\x04")  # Ctrl-D
        end = time.monotonic() + 120
        while status is None and time.monotonic() < end:
            done, code = os.waitpid(pid, os.WNOHANG)
            status = os.waitstatus_to_exitcode(code) if done else None
            time.sleep(0.2)
        assert status == 0, seen
    finally:
        if status is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(master)
    assert b"edgelm chat:" in seen and b"Ctrl-C again" in seen
