"""The model configuration shared by the host (converters) and the device (runtime).

It describes the canonical decoder with per-layer head counts and FFN widths, so
a structurally pruned model is still a plain model. Torch-free on purpose: the
runtime reads it from the bundle manifest to size KV-cache buffers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ArchTraits:
    """How one architecture's decoder differs from a Llama's (the defaults)."""

    norm: str = "rms"  # "rms" or "layer" (LayerNorm with a bias)
    positions: str = "rope"  # "rope" or "learned" (an embedding per position, added to the token's)
    gated_mlp: bool = True  # w_down(act(w_gate x) * w_up x), else w_down(act(w_up x))
    activation: str = "silu"  # "silu", "gelu_tanh", "gelu" (exact) or "relu"
    # "pre": norms on the attention's and MLP's inputs; "sandwich": on their outputs too; "post": on their
    # outputs only; "parallel": attention and MLP both read the block's input (each through its own norm,
    # or through one with "parallel_shared") and both add to it
    block: str = "pre"
    # q/k RMSNorm: None, "head" (over each head, before RoPE), "head_after_rope", "full" (over the whole
    # projection, before RoPE)
    qk_norm: str | None = None
    scaled_embedding: bool = False  # the token embedding times sqrt(dim)
    output_bias: bool = False  # a bias on the LM head


#: every architecture the canonical decoder computes; a family that differs from one of these only by
#: constants or a weight layout (Mistral, Phi-3, Granite, GLM, ...) converts to it
ARCH_TRAITS: dict[str, ArchTraits] = {
    "llama": ArchTraits(),
    "qwen2": ArchTraits(),
    "qwen3": ArchTraits(qk_norm="head"),
    "gemma": ArchTraits(activation="gelu_tanh", scaled_embedding=True),
    "gemma2": ArchTraits(activation="gelu_tanh", block="sandwich", scaled_embedding=True),
    "gemma3": ArchTraits(activation="gelu_tanh", block="sandwich", qk_norm="head", scaled_embedding=True),
    "gpt2": ArchTraits(norm="layer", positions="learned", gated_mlp=False, activation="gelu_tanh"),
    "stablelm": ArchTraits(norm="layer"),
    "opt": ArchTraits(norm="layer", positions="learned", gated_mlp=False, activation="relu"),
    "phi": ArchTraits(norm="layer", gated_mlp=False, activation="gelu_tanh", block="parallel_shared",
                      output_bias=True),
    "gpt_neox": ArchTraits(norm="layer", gated_mlp=False, activation="gelu", block="parallel"),
    "olmo2": ArchTraits(block="post", qk_norm="full"),
    "exaone4": ArchTraits(block="post", qk_norm="head"),
    "hunyuan": ArchTraits(qk_norm="head_after_rope"),
    # LFM2: Qwen3's attention layers between gated short-convolution layers (ModelConfig.conv_layers)
    "lfm2": ArchTraits(qk_norm="head"),
}
ARCHITECTURES = tuple(ARCH_TRAITS)
ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")
#: KV cache element types. ``int8`` stores each cached row of a head as int8 codes with its own scale (and in a
#: .pte with ExecuTorch's llama:: kernels a zero point; see ``converters.model.Attention``), in the formats of
#: :data:`INT8_KV_FORMATS`.
KV_CACHE_DTYPES = ("fp32", "int8")
INT8_KV_FORMATS = ("pte", "onnx")
#: How a .pte attends and writes its KV cache. ``custom``: ExecuTorch's ``llama::`` kernels (``update_cache``,
#: ``custom_sdpa``), whose aarch64 build needs an ARMv8.2-A core. ``portable``: plain ATen ops (cache writes with
#: ``index_put_`` in ExecuTorch's portable kernels, ``bmm`` and ``softmax`` in XNNPACK), which run on any core, an
#: ARMv8.0-A Raspberry Pi 4's too.
PTE_ATTENTIONS = ("custom", "portable")


@dataclass
class ModelConfig:
    """Shape of a canonical decoder.

    ``n_heads``, ``n_kv_heads`` and ``ffn_dim`` are per layer (lists of length
    ``n_layers``) so pruned models need no special code.
    """

    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: list[int]
    n_kv_heads: list[int]
    ffn_dim: list[int]
    head_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    max_context: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # low-rank factorization (converters/compress): module path in a block, e.g. "layers.3.mlp.w_down",
    # -> rank r of its two-matrix form (in -> r -> out). None: every linear is a plain matrix.
    low_rank: dict[str, int] | None = None
    # The sliding-window layers (Gemma 3's local layers, Qwen2's upper ones). With ``sliding_window``
    # set, a position in them attends to itself and the ``sliding_window - 1`` before it (None: every
    # layer does). With ``local_rope_theta`` set (Gemma 3), their rotary embedding uses that base and no
    # scaling instead of rope_theta / rope_scaling.
    local_layers: list[int] | None = None
    local_rope_theta: float | None = None
    sliding_window: int | None = None
    # RoPE on the first ``rotary_dim`` dimensions of each head only (Phi-4-mini's partial_rotary_factor
    # 0.75); the rest pass through unrotated. None: the whole head.
    rotary_dim: int | None = None
    # Soft-capping (Gemma 2): attention scores become ``cap * tanh(score / cap)`` before the mask, and
    # so do the final logits with their own cap. None: no capping.
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # Layers without a rotary embedding (SmolLM3's NoPE layers, every 4th): their queries and keys
    # carry no position; the causal mask still does. None: every layer rotates.
    nope_layers: list[int] | None = None
    # The MLP's activation where a model's config departs from its architecture's (a GPT-2 with ReLU,
    # Gemma 1's exact GELU): one of ACTIVATIONS. None: the architecture's own (ArchTraits.activation).
    activation: str | None = None
    # Short-convolution layers (LFM2) in place of attention: ``wo(C * conv(B * X))`` with B, C, X from one
    # projection ``w_in`` and a causal depthwise convolution of ``conv_kernel`` taps over the positions. What
    # the convolution reads of earlier positions, B * X (``dim`` wide), is cached per position like keys and
    # values, so a cache can be rewound (speculative decoding, a conversation's shared prefix): its first half
    # in the layer's K cache, its second in its V cache. So in these layers ``n_kv_heads * head_dim`` is
    # ``dim / 2`` and ``n_heads == n_kv_heads``: they shape the cache, not heads. None: every layer attends.
    conv_layers: list[int] | None = None
    conv_kernel: int | None = None
    conv_bias: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; known: {', '.join(ARCHITECTURES)}")
        for name in ("n_heads", "n_kv_heads", "ffn_dim"):
            value = getattr(self, name)
            if isinstance(value, int):
                setattr(self, name, [value] * self.n_layers)
            elif len(value) != self.n_layers:
                raise ValueError(f"{name} has {len(value)} entries for {self.n_layers} layers")
            else:
                setattr(self, name, [int(v) for v in value])
        for i, (h, kv) in enumerate(zip(self.n_heads, self.n_kv_heads)):
            if kv <= 0 or h <= 0 or h % kv:
                raise ValueError(f"layer {i}: {h} query heads cannot be grouped over {kv} KV heads")
        if self.local_layers is not None:
            self.local_layers = sorted(int(i) for i in self.local_layers)
            if any(not 0 <= i < self.n_layers for i in self.local_layers):
                raise ValueError(f"local_layers {self.local_layers} need indices below {self.n_layers}")
            if not (self.local_rope_theta or self.sliding_window):
                raise ValueError("local_layers need a local_rope_theta or a sliding_window")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive number of tokens, not {self.sliding_window}")
        if self.nope_layers is not None:
            self.nope_layers = sorted(int(i) for i in self.nope_layers)
            if any(not 0 <= i < self.n_layers for i in self.nope_layers):
                raise ValueError(f"nope_layers {self.nope_layers} need indices below {self.n_layers}")
        if self.conv_layers is not None:
            self.conv_layers = sorted(int(i) for i in self.conv_layers)
            if any(not 0 <= i < self.n_layers for i in self.conv_layers):
                raise ValueError(f"conv_layers {self.conv_layers} need indices below {self.n_layers}")
            if not self.conv_kernel or self.conv_kernel < 2:
                raise ValueError(f"conv_layers need a conv_kernel of at least 2 taps, not {self.conv_kernel}")
            for i in self.conv_layers:
                if self.n_heads[i] != self.n_kv_heads[i] or 2 * self.n_kv_heads[i] * self.head_dim != self.dim:
                    raise ValueError(f"convolution layer {i} caches B * X ({self.dim} wide) in K and V halves: it "
                                     f"needs n_heads == n_kv_heads == dim / (2 * head_dim) = "
                                     f"{self.dim / (2 * self.head_dim):g}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {', '.join(ACTIVATIONS)}")
        if self.rotary_dim is not None and not (2 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim must be even and within the head ({self.head_dim}), not {self.rotary_dim}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the form stored in ``edgelm.json``)."""
        data = asdict(self)
        # the optional fields stay out when unused: manifests stay readable by runtimes that predate them
        for name in ("low_rank", "local_layers", "local_rope_theta", "sliding_window", "rotary_dim", "attn_softcap",
                     "final_softcap", "nope_layers", "activation", "conv_layers", "conv_kernel", "conv_bias"):
            if not data[name]:
                data.pop(name)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**data)

    @property
    def traits(self) -> ArchTraits:
        """What this architecture changes in the decoder (see :data:`ARCH_TRAITS`)."""
        return ARCH_TRAITS[self.arch]

    @property
    def learned_positions(self) -> bool:
        """A learned position embedding added to the token embedding (GPT-2, OPT), not rotary embeddings."""
        return self.traits.positions == "learned"

    @property
    def layer_norm(self) -> bool:
        """LayerNorm with a bias rather than RMSNorm."""
        return self.traits.norm == "layer"

    @property
    def gated_mlp(self) -> bool:
        """SwiGLU / GeGLU (``w_down(act(w_gate x) * w_up x)``) rather than ``w_down(act(w_up x))``."""
        return self.traits.gated_mlp

    @property
    def parallel_residual(self) -> bool:
        """Attention and MLP both read the block's input and add to it (Phi, GPT-NeoX), instead of the
        MLP reading the attention's result."""
        return self.traits.block in ("parallel", "parallel_shared")

    @property
    def shared_norm(self) -> bool:
        """One norm per block feeds both attention and MLP (Phi): ``attn_norm``; there is no ``mlp_norm``."""
        return self.traits.block == "parallel_shared"

    @property
    def output_bias(self) -> bool:
        """A bias on the LM head (Phi)."""
        return self.traits.output_bias

    @property
    def qk_norm(self) -> bool:
        """An RMSNorm on the queries and keys: over each head (see :attr:`qk_norm_after_rope`) or over all
        of a layer's heads at once (:attr:`qk_norm_full`)."""
        return self.traits.qk_norm is not None

    @property
    def qk_norm_after_rope(self) -> bool:
        """The per-head q/k norms apply to the rotated queries and keys (Hunyuan), not before RoPE."""
        return self.traits.qk_norm == "head_after_rope"

    @property
    def qk_norm_full(self) -> bool:
        """The q/k norm spans the whole projection (``n_heads * head_dim``), not one head (OLMo 2)."""
        return self.traits.qk_norm == "full"

    @property
    def sandwich_norm(self) -> bool:
        """A norm on the attention and MLP outputs too, before the residual add (Gemma 2 and 3)."""
        return self.traits.block == "sandwich"

    @property
    def post_norm(self) -> bool:
        """Norms on the attention and MLP outputs only, before the residual add (OLMo 2, EXAONE 4)."""
        return self.traits.block == "post"

    @property
    def embedding_scale(self) -> float:
        """Factor on the token embedding (Gemma: sqrt(dim); 1 elsewhere)."""
        return self.dim ** 0.5 if self.traits.scaled_embedding else 1.0

    @property
    def mlp_activation(self) -> str:
        """``silu``, ``gelu_tanh``, ``gelu`` (the exact one) or ``relu``."""
        return self.activation or self.traits.activation

    def is_conv(self, layer: int) -> bool:
        """Whether ``layer`` is a short-convolution layer (see :attr:`conv_layers`), not attention."""
        return layer in (self.conv_layers or ())

    def block_linears(self, layer: int) -> list[str]:
        """Names of the linears of block ``layer``, e.g. ``"layers.3.attn.wq"`` (a convolution layer's are
        ``attn.w_in`` and ``attn.wo``: its token mixer sits where attention does)."""
        mlp = ("w_gate", "w_up", "w_down") if self.gated_mlp else ("w_up", "w_down")
        mixer = ("w_in", "wo") if self.is_conv(layer) else ("wq", "wk", "wv", "wo")
        return [f"layers.{layer}.attn.{p}" for p in mixer] + [f"layers.{layer}.mlp.{p}" for p in mlp]

    def num_parameters(self) -> int:
        """Parameter count, counting a tied embedding once."""
        d = self.dim
        norm = 2 * d if self.layer_norm else d
        total = self.vocab_size * d * (1 if self.tie_embeddings else 2) + norm
        if self.output_bias:
            total += self.vocab_size
        if self.learned_positions:
            total += self.max_context * d
        for i, (h, kv, f) in enumerate(zip(self.n_heads, self.n_kv_heads, self.ffn_dim)):
            total += sum(n_in * n_out for n_in, n_out in map(self.linear_shape, self.block_linears(i)))
            norms = 4 if self.sandwich_norm else 1 if self.shared_norm else 2
            total += norms * norm
            if self.mlp_bias:
                total += (2 if self.gated_mlp else 1) * f + d
            if self.is_conv(i):  # the taps; biases on w_in (3d), the convolution and wo
                total += d * self.conv_kernel + (5 * d if self.conv_bias else 0)
                continue
            if self.qk_norm:
                total += (h + kv) * self.head_dim if self.qk_norm_full else 2 * self.head_dim
            if self.qkv_bias:
                total += (h + 2 * kv) * self.head_dim
            if self.o_bias:
                total += d
        for name, rank in (self.low_rank or {}).items():
            n_in, n_out = self.linear_shape(name)
            total += rank * (n_in + n_out) - n_in * n_out
        return total

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a block linear, e.g. ``"layers.3.mlp.w_down"``."""
        _, layer, kind, proj = name.split(".")
        i, d, hd = int(layer), self.dim, self.head_dim
        if self.is_conv(i) and proj in ("w_in", "wo"):
            return (d, 3 * d) if proj == "w_in" else (d, d)
        shapes = {"wq": (d, self.n_heads[i] * hd), "wk": (d, self.n_kv_heads[i] * hd),
                  "wv": (d, self.n_kv_heads[i] * hd), "wo": (self.n_heads[i] * hd, d),
                  "w_gate": (d, self.ffn_dim[i]), "w_up": (d, self.ffn_dim[i]), "w_down": (self.ffn_dim[i], d)}
        return shapes[proj]

    def window(self, layer: int) -> int | None:
        """How many positions (itself included) a position of ``layer`` attends to; None: all before it."""
        if self.sliding_window is None or (self.local_layers is not None and layer not in self.local_layers):
            return None
        return self.sliding_window

    def local_rope(self, layer: int) -> bool:
        """Whether ``layer`` takes its rotary embedding from ``local_rope_theta`` (Gemma 3's local layers)."""
        return bool(self.local_rope_theta) and layer in (self.local_layers or ())

    def kv_cache_shape(self, layer: int) -> tuple[int, int, int, int]:
        """[batch, kv_heads, max_context, head_dim] of one layer's K (or V) cache."""
        return (1, self.n_kv_heads[layer], self.max_context, self.head_dim)
