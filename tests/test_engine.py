"""The runtime engine on a real .pte of the tiny model."""

from __future__ import annotations

import pytest
import torch

from edgelm.converters.model import build_decoder
from edgelm.errors import ContextOverflowError
from edgelm.runtime import Engine, SamplingConfig


def eager_greedy(source, ids, n, eos=()):
    model = build_decoder(source.config, source.state_dict).make_stateful("plain")
    out = []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.tensor([0]))[0]
        pos = len(ids)
        for _ in range(n):
            tok = int(logits.argmax())
            if tok in eos:
                break
            out.append(tok)
            logits = model(torch.tensor([[tok]]), torch.tensor([pos]))[0]
            pos += 1
    return out


@pytest.fixture(scope="module")
def engine(tiny_pte):
    return Engine.load(tiny_pte, threads=1)


def test_greedy_equals_eager_including_chunked_prompt(engine, tiny_source):
    max_prefill = engine.backend.max_prefill
    assert max_prefill == 16
    for prompt in ["hello", "x" * (max_prefill * 2 + 3), "y" * (max_prefill + 1)]:
        ids = engine.encode_prompt(prompt)
        want = eager_greedy(tiny_source, ids, 30, eos=engine.eos_ids)
        got = list(engine.generate_ids(ids, max_new_tokens=30))
        assert got == want
        assert engine.last_stats.prompt_tokens == len(ids)


def test_stats_and_stop_reasons(engine):
    pieces = list(engine.generate("abc", max_new_tokens=12))
    s = engine.last_stats
    assert s.generated_tokens == 12 and s.stop_reason == "max_tokens"
    assert s.ttft_s > 0 and s.decode_tps > 0 and s.prefill_tps > 0 and 0 <= s.overhead_share < 1
    assert s.decode_steps == 11
    assert "".join(pieces) == engine.tokenizer.decode(list(engine.generate_ids(engine.encode_prompt("abc"), 12)))


def test_stop_string_cuts_output(engine):
    full = engine.complete("abc", max_new_tokens=20)
    assert len(full) > 4
    stop = full[3:5]
    cut = engine.complete("abc", max_new_tokens=20, stop=[stop])
    assert cut == full[: full.find(stop)]
    assert engine.last_stats.stop_reason == "stop_string"


def test_sampling_is_seeded(engine):
    cfg = SamplingConfig(temperature=0.9, top_k=20, top_p=0.9, seed=3)
    a = engine.complete("seeded", max_new_tokens=10, sampling=cfg)
    b = engine.complete("seeded", max_new_tokens=10, sampling=cfg)
    assert a == b


def test_context_overflow(engine):
    ctx = engine.max_context
    with pytest.raises(ContextOverflowError, match="context window is"):
        engine.complete("y" * (ctx + 5), max_new_tokens=4)
    text = engine.complete("y" * (ctx + 5), max_new_tokens=4, overflow="truncate")
    assert engine.last_stats.truncated_prompt_tokens == ctx + 5 - (ctx - 4)
    assert engine.last_stats.prompt_tokens == ctx - 4 and isinstance(text, str)
    # a prompt that fits but leaves little room stops when the window is full
    list(engine.generate_ids([1] * (ctx - 2), max_new_tokens=10))
    assert engine.last_stats.stop_reason in ("context_full", "eos")
    with pytest.raises(ContextOverflowError, match="empty"):
        engine.complete("", max_new_tokens=4)


def test_chat_prompt_uses_template(engine):
    ids = engine.encode_prompt("hi", chat=True, system="sys")
    text = engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nsys<|im_end|>") and text.endswith("<|im_start|>assistant\n")


MKL_THREADS = """
import ctypes, sys
from pathlib import Path
from edgelm.runtime import Engine
engine = Engine.load(sys.argv[1], threads=2)
assert len(list(engine.generate_ids([1, 2, 3], max_new_tokens=3, ignore_eos=True))) == 3
import torch
mkl = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
print(mkl.mkl_get_max_threads())
"""


def test_pte_runtime_keeps_mkl_to_one_thread_under_its_pool(tiny_pte):
    """ExecuTorch's attention kernels call MKL from inside each pool thread; MKL's own threads on top
    oversubscribe the cores (README: Threads (pte)). The backend sets MKL to one thread before torch loads it,
    and a user's MKL_NUM_THREADS / OMP_NUM_THREADS wins."""
    import ctypes
    import os
    import subprocess
    import sys
    from pathlib import Path

    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    if not hasattr(lib, "mkl_get_max_threads"):
        pytest.skip("this torch build has no MKL")
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_NUM_THREADS", "OMP_NUM_THREADS")}

    def mkl_threads(**extra) -> int:
        out = subprocess.run([sys.executable, "-c", MKL_THREADS, str(tiny_pte)], env={**env, **extra},
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[-1])

    assert mkl_threads() == 1
    assert mkl_threads(MKL_NUM_THREADS="2") == 2
