"""Target profiles: what edgelm knows about a device and what it should do there.

One TOML file per target lives beside this module (``raspberry-pi-4.toml`` ...). A
profile has four tables:

- ``[device]``: architecture (as ``uname -m`` prints it), cores, CPU features (ARM
  architecture names such as ``dotprod``, not ``/proc/cpuinfo`` spellings such as
  ``asimddp``), memory and the share of it a model may use;
- ``[convert]``: formats in order of preference, quantization scheme, group size,
  threads, ``max_context``, ``max_prefill`` and the fixed prefill lengths TFLite needs;
- ``[runtime]``: the pip packages the device needs, common ones and per format;
- ``[deploy]``: transport, working folder and Python command on the device.

A user profile is a TOML file of the same shape. It may say ``extends = "raspberry-pi-5"``
(a built-in name, or a path relative to the file) and set only the keys it changes:
tables are merged key by key, arrays are replaced whole.

Every mistake is a :class:`TargetError` naming the file and the key. Stdlib only (plus
``tomli`` on Python 3.10) and :mod:`edgelm.config` / :mod:`edgelm.errors`, so it runs on
a device without torch.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

from edgelm.config import INT8_KV_FORMATS, KV_CACHE_DTYPES, PTE_ATTENTIONS, ModelConfig
from edgelm.errors import EdgeLMError

__all__ = [
    "FORMATS", "SCHEMES", "FORMAT_SCHEMES", "ARCHITECTURES", "TRANSPORTS", "FEATURES", "TargetError",
    "Device", "Convert", "Runtime", "Deploy", "Profile", "MemoryEstimate",
    "list_profiles", "load_profile", "profile_to_dict", "profile_from_dict", "apply_profile",
    "estimate_memory", "check_memory",
]

FORMATS = ("pte", "onnx", "tflite")
SCHEMES = ("fp32", "w8", "w8a8", "w8a8-static", "w4a8")
#: The schemes each format's lowering can do (the lowerings register the same; a test compares them).
FORMAT_SCHEMES = {"pte": ("fp32", "w8a8", "w4a8"), "onnx": SCHEMES, "tflite": ("fp32", "w8", "w8a8", "w4a8")}
ARCHITECTURES = ("aarch64", "x86_64")
TRANSPORTS = ("local", "ssh", "adb", "qemu-arm64")
FEATURES = {
    "aarch64": ("neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2", "sme", "crc32", "aes", "sha2", "atomics"),
    "x86_64": ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni",
               "avx512_bf16", "amx"),
}
MIN_CONTEXT = 16
MIN_GROUP_SIZE = 16
MB = 1 << 20  # memory_mb and every "MB" in messages are MiB


class TargetError(EdgeLMError):
    """A target profile is missing, malformed, or the model does not fit the target."""


# --------------------------------------------------------------------------- profile


@dataclass
class Device:
    """What is known of the device."""

    architecture: str
    cores: int
    features: list[str]
    memory_mb: int
    big_cores: int | None = None  # None: all cores alike
    usable_fraction: float = 0.75  # share of memory_mb the model (weights, KV cache, runtime) may use
    soc: str = ""
    cpu: str = ""
    isa: str = ""
    clock_mhz: int | None = None

    @property
    def budget_bytes(self) -> int:
        return int(self.memory_mb * MB * self.usable_fraction)


@dataclass
class Convert:
    """What ``edgelm convert`` should produce for the device."""

    formats: list[str]
    scheme: str
    threads: int
    max_context: int
    group_size: int = 32  # w4a8 only; the 8-bit schemes are per output channel
    max_prefill: int = 512
    prefill_lengths: list[int] = field(default_factory=list)  # tflite: one static signature per length
    pte_attention: str = "custom"  # pte: ExecuTorch's llama:: kernels or plain ops (edgelm.config.PTE_ATTENTIONS)


@dataclass
class Runtime:
    """pip packages the device needs: ``common`` plus the list of the bundle's format."""

    common: list[str] = field(default_factory=lambda: ["numpy", "tokenizers", "jinja2"])
    pte: list[str] = field(default_factory=lambda: ["executorch", "torch"])
    onnx: list[str] = field(default_factory=lambda: ["onnxruntime"])
    tflite: list[str] = field(default_factory=lambda: ["ai-edge-litert"])


@dataclass
class Deploy:
    """How to reach the device and where to put things there."""

    transport: str
    workdir: str
    python: str = "python3"


@dataclass
class Profile:
    """A resolved target profile (``extends`` already applied)."""

    name: str
    device: Device
    convert: Convert
    deploy: Deploy
    runtime: Runtime = field(default_factory=Runtime)
    description: str = ""
    extends: str | None = None
    path: str | None = field(default=None, compare=False)  # where it was read from; not part of the dict form

    @property
    def format(self) -> str:
        """The preferred format."""
        return self.convert.formats[0]

    def packages(self, fmt: str | None = None) -> list[str]:
        """pip packages the device needs to run a bundle of ``fmt`` (default: the preferred format)."""
        fmt = fmt or self.format
        if fmt not in FORMATS:
            raise TargetError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
        return [*self.runtime.common, *getattr(self.runtime, fmt)]


_SECTIONS: dict[str, type] = {"device": Device, "convert": Convert, "runtime": Runtime, "deploy": Deploy}
_TOP_KEYS = ("name", "description", "extends", *_SECTIONS)
_REQUIRED_SECTIONS = ("device", "convert", "deploy")
_HINTS = {cls: typing.get_type_hints(cls) for cls in _SECTIONS.values()}


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _required(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


# --------------------------------------------------------------------------- reading files


def _builtin_dir():
    return resources.files(__name__)


def list_profiles() -> list[str]:
    """Names of the built-in profiles, sorted."""
    return sorted(p.name[: -len(".toml")] for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def _looks_like_path(s: str | os.PathLike[str]) -> bool:
    if isinstance(s, os.PathLike):
        return True
    return s.endswith(".toml") or "/" in s or os.sep in s or s.startswith((".", "~"))


def _parse(text: str, label: str) -> dict[str, Any]:
    if tomllib is None:
        raise TargetError(f"{label}: reading TOML on Python 3.10 needs the tomli package; pip install tomli")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"{label}: not valid TOML: {e}") from e


def _read(ref: str | os.PathLike[str], base_dir: Path | None, referrer: str | None) -> tuple[str, Path | None, dict]:
    """(label for messages, folder of the file or None for a built-in, parsed TOML) of a name or a path."""
    prefix = f"{referrer}: extends: " if referrer else ""
    if _looks_like_path(ref):
        path = Path(os.path.expanduser(os.fspath(ref)))
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise TargetError(f"{prefix}no profile file {os.fspath(path)!r}; give a path to a .toml file or one of "
                              f"the built-in targets: {', '.join(list_profiles())}")
        label = os.fspath(ref) if referrer is None else os.fspath(path)
        return label, path.parent, _parse(path.read_text(encoding="utf-8"), label)
    known = list_profiles()
    if ref not in known:
        close = difflib.get_close_matches(str(ref), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TargetError(f"{prefix}unknown target {ref!r}; {hint}known targets: {', '.join(known)} "
                          "(or give a path to your own .toml file)")
    label = f"{ref}.toml"
    return label, None, _parse((_builtin_dir() / label).read_text(encoding="utf-8"), label)


# --------------------------------------------------------------------------- shape checks (per file)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"an array of {_type_name(inner).removeprefix('a ').removeprefix('an ')}s"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}[tp]


def _value_name(v: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "table"}.get(
        type(v), type(v).__name__)
    return f"{kind} {v!r}" if not isinstance(v, (list, dict)) else kind


def _is(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, list) and all(_is(v, inner) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, a) for a in typing.get_args(tp) if a is not type(None))
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _unknown(label: str, key: str, known: list[str] | tuple[str, ...], where: str) -> TargetError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return TargetError(f"{label}: {key}: unknown key; {hint}known keys {where}: {', '.join(known)}")


def _check_shape(raw: dict[str, Any], label: str) -> None:
    """Unknown keys and wrong types, in the file that wrote them."""
    for key, value in raw.items():
        if key not in _TOP_KEYS:
            raise _unknown(label, key, _TOP_KEYS, "at the top level")
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise TargetError(f"{label}: {key}: expected a table [{key}], got {_value_name(value)}")
            cls = _SECTIONS[key]
            known = list(_fields(cls))
            for sub, v in value.items():
                if sub not in known:
                    raise _unknown(label, f"{key}.{sub}", known, f"in [{key}]")
                tp = _HINTS[cls][sub]
                if not _is(v, tp):
                    raise TargetError(f"{label}: {key}.{sub}: expected {_type_name(tp)}, got {_value_name(v)}")
        elif not isinstance(value, str):
            raise TargetError(f"{label}: {key}: expected a string, got {_value_name(value)}")


# --------------------------------------------------------------------------- extends + merge


def _merge(base: dict, over: dict, origin: dict[str, str], label: str, prefix: str = "") -> dict:
    """Deep merge ``over`` into a copy of ``base``: tables key by key, everything else (arrays too) replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origin, label, dotted + ".")
        else:
            out[key] = copy.deepcopy(value)
            if isinstance(value, dict):
                for sub in value:
                    origin[f"{dotted}.{sub}"] = label
            else:
                origin[dotted] = label
    return out


def _resolve(ref: str | os.PathLike[str], base_dir: Path | None = None, chain: tuple[str, ...] = (),
             referrer: str | None = None) -> tuple[str, dict, dict[str, str]]:
    """(label, merged raw dict, origin: dotted key -> label of the file that set it)."""
    label, folder, raw = _read(ref, base_dir, referrer)
    _check_shape(raw, label)
    key = os.path.realpath(folder / Path(label).name) if folder is not None else label
    if key in chain:
        raise TargetError(f"{label}: extends: profiles extend each other in a loop")
    parent = raw.get("extends")
    if parent is None:
        base, origin = {}, {}
    else:
        _, base, origin = _resolve(parent, folder, (*chain, key), label)
        base.pop("name", None)  # a profile that changes things is named after its file (or its own name key)
        base.pop("description", None)  # and describes itself (or gets a default)
    merged = _merge(base, {k: v for k, v in raw.items() if k != "extends"}, origin, label)
    merged["extends"] = parent
    return label, merged, origin


# --------------------------------------------------------------------------- value checks (merged)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _validate(p: Profile, label: str, origin: dict[str, str]) -> None:
    def fail(key: str, msg: str) -> TargetError:
        src = origin.get(key, label)
        where = f" (set in {src}; set {key} in {label} too)" if src != label else ""
        return TargetError(f"{label}: {key}: {msg}{where}")

    d, c, r, dep = p.device, p.convert, p.runtime, p.deploy
    if d.architecture not in ARCHITECTURES:
        raise fail("device.architecture", f"must be one of {', '.join(ARCHITECTURES)} (as `uname -m` prints it), "
                                          f"got {d.architecture!r}")
    if d.cores < 1:
        raise fail("device.cores", f"must be >= 1, got {d.cores}")
    if d.big_cores is not None and not 1 <= d.big_cores <= d.cores:
        raise fail("device.big_cores", f"must be between 1 and device.cores ({d.cores}), got {d.big_cores}")
    known = FEATURES[d.architecture]
    for feat in d.features:
        if feat not in known:
            close = difflib.get_close_matches(feat, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise fail("device.features", f"unknown {d.architecture} feature {feat!r}; {hint}known: {', '.join(known)}")
    if d.memory_mb <= 0:
        raise fail("device.memory_mb", f"must be > 0, got {d.memory_mb}")
    if not 0 < d.usable_fraction <= 1:
        raise fail("device.usable_fraction", f"must be in (0, 1], got {d.usable_fraction}")
    if d.clock_mhz is not None and d.clock_mhz <= 0:
        raise fail("device.clock_mhz", f"must be > 0, got {d.clock_mhz}")

    if not c.formats:
        raise fail("convert.formats", f"must list at least one of {', '.join(FORMATS)}")
    for fmt in c.formats:
        if fmt not in FORMATS:
            raise fail("convert.formats", f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if len(set(c.formats)) != len(c.formats):
        raise fail("convert.formats", f"lists a format twice: {c.formats}")
    if c.scheme not in SCHEMES:
        raise fail("convert.scheme", f"unknown scheme {c.scheme!r}; choose one of {', '.join(SCHEMES)}")
    if not _power_of_two(c.group_size) or c.group_size < MIN_GROUP_SIZE:
        raise fail("convert.group_size", f"must be a power of two >= {MIN_GROUP_SIZE}, got {c.group_size}")
    if c.threads < 1:
        raise fail("convert.threads", f"must be >= 1, got {c.threads}")
    if c.threads > d.cores:
        raise fail("convert.threads", f"must be <= device.cores ({d.cores}), got {c.threads}")
    if c.max_context < MIN_CONTEXT:
        raise fail("convert.max_context", f"must be >= {MIN_CONTEXT}, got {c.max_context}")
    if not 2 <= c.max_prefill <= c.max_context:
        raise fail("convert.max_prefill", f"must be between 2 and convert.max_context ({c.max_context}), "
                                          f"got {c.max_prefill}")
    lengths = c.prefill_lengths
    if any(n < 1 for n in lengths):
        raise fail("convert.prefill_lengths", f"must be >= 1 each, got {lengths}")
    if any(a >= b for a, b in zip(lengths, lengths[1:], strict=False)):
        raise fail("convert.prefill_lengths", f"must be in ascending order without repeats, got {lengths}")
    if lengths and lengths[-1] > c.max_context:
        raise fail("convert.prefill_lengths", f"must not exceed convert.max_context ({c.max_context}), got {lengths}")
    if c.pte_attention not in PTE_ATTENTIONS:
        raise fail("convert.pte_attention", f"unknown value {c.pte_attention!r}; choose one of "
                                            f"{', '.join(PTE_ATTENTIONS)}")
    if "tflite" in c.formats and not lengths:
        raise fail("convert.prefill_lengths", "tflite needs at least one prefill length (its graphs have "
                                              "static shapes)")

    for name in ("common", *FORMATS):
        for pkg in getattr(r, name):
            if not pkg.strip():
                raise fail(f"runtime.{name}", "package names must not be empty")
    for fmt in c.formats:
        if not getattr(r, fmt):
            raise fail(f"runtime.{fmt}", f"is empty, but convert.formats lists {fmt}")

    if dep.transport not in TRANSPORTS:
        raise fail("deploy.transport", f"unknown transport {dep.transport!r}; choose one of {', '.join(TRANSPORTS)}")
    if not dep.workdir.strip():
        raise fail("deploy.workdir", "must not be empty")
    if not dep.python.strip():
        raise fail("deploy.python", "must not be empty")


def _build(merged: dict[str, Any], label: str, origin: dict[str, str], default_name: str) -> Profile:
    sections = {}
    for name in _REQUIRED_SECTIONS:
        if name not in merged:
            raise TargetError(f"{label}: [{name}]: missing table (or say extends = \"<a built-in target>\" to "
                              "start from one)")
    for name, cls in _SECTIONS.items():
        data = merged.get(name, {})
        for key in _required(cls):
            if key not in data:
                raise TargetError(f"{label}: {name}.{key}: missing (required)")
        sections[name] = cls(**copy.deepcopy(data))
    profile = Profile(name=merged.get("name") or default_name, description=merged.get("description", ""),
                      extends=merged.get("extends"), **sections)
    _validate(profile, label, origin)
    return profile


def load_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    """A built-in target by name (``raspberry-pi-4``) or a user profile from a ``.toml`` path, validated.

    A path is anything ending in ``.toml`` or containing a path separator; ``extends`` in a
    user file names a built-in target or a path relative to that file.
    """
    label, merged, origin = _resolve(name_or_path)
    stem = Path(label).name.removesuffix(".toml")
    if merged.get("extends") and "description" not in merged:
        merged["description"] = f"{merged['extends']} with changes from {label}"
    profile = _build(merged, label, origin, stem)
    profile.path = os.fspath(name_or_path) if _looks_like_path(name_or_path) else f"builtin:{stem}"
    return profile


def profile_to_dict(profile: Profile) -> dict[str, Any]:
    """A JSON-ready dict of the resolved profile (the form stored in a bundle manifest's ``target``)."""
    data = dataclasses.asdict(profile)
    data.pop("path")
    return data


def profile_from_dict(data: dict[str, Any], where: str = "target") -> Profile:
    """Inverse of :func:`profile_to_dict`, validated (``where`` names the source in messages)."""
    raw = copy.deepcopy(data)
    extends = raw.pop("extends", None)
    for name in _SECTIONS:  # None is how the dict form writes an optional value left unset
        if isinstance(raw.get(name), dict):
            raw[name] = {k: v for k, v in raw[name].items() if v is not None}
    _check_shape(raw, where)
    raw["extends"] = extends
    return _build(raw, where, {}, raw.get("name") or "target")


def apply_profile(profile: Profile, *, format: str | None = None, scheme: str | None = None,
                  group_size: int | None = None, max_context: int | None = None, max_prefill: int | None = None,
                  prefill_lengths: list[int] | tuple[int, ...] | None = None,
                  pte_attention: str | None = None) -> dict[str, Any]:
    """Conversion settings: the profile's, with every argument that is not None overriding it.

    When an explicit ``max_context`` is smaller than the profile's ``max_prefill`` or prefill
    lengths, those profile values are clamped to it (explicit values are passed through).
    Threads are not here: they are the device's (``profile.convert.threads``, recorded in the
    manifest's ``target``), not the host's.
    """
    c = profile.convert
    if format is not None and format not in FORMATS:
        raise TargetError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")
    if scheme is not None and scheme not in SCHEMES:
        raise TargetError(f"unknown scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    ctx = c.max_context if max_context is None else max_context
    if max_prefill is None:
        max_prefill = max(2, min(c.max_prefill, ctx))
    if prefill_lengths is None:
        prefill_lengths = [n for n in c.prefill_lengths if n <= ctx] or [min(ctx, max_prefill)]
    return {
        "format": format or profile.format,
        "scheme": scheme or c.scheme,
        "group_size": c.group_size if group_size is None else group_size,
        "max_context": ctx,
        "max_prefill": max_prefill,
        "prefill_lengths": tuple(prefill_lengths),
        "pte_attention": pte_attention or c.pte_attention,
    }


# --------------------------------------------------------------------------- memory check

#: What the runtime process holds before any weight: Python with numpy, tokenizers and the format's
#: runtime library. Measured peak RSS on x86-64 (a tiny bundle loaded, 8 tokens generated): pte 370 MB
#: (ExecuTorch's Python bindings load torch), onnx 72 MB, tflite 54 MB; rounded up.
RUNTIME_BASE_BYTES = {"pte": 384 * MB, "onnx": 80 * MB, "tflite": 64 * MB}
#: The runtime's working copy of the weights, as a share of the stored weights, fp32 / quantized
#: (see :func:`weight_copies_bytes`).
PTE_PACKED_SHARE = {"fp32": 0.6, "quantized": 0.3}
ONNX_PREPACKED_SHARE = {"fp32": 0.5, "quantized": 0.0}
SCALE_BYTES = 4  # one fp32 scale per output channel (8-bit) or per group (4-bit)
_WEIGHT_BITS = {"fp32": 32, "w8": 8, "w8a8": 8, "w8a8-static": 8, "w4a8": 4}
_SMALLER = ("w8a8", "w4a8")  # smaller weights, in the order to try (w8 and w8a8-static weigh what w8a8 does)


@dataclass
class MemoryEstimate:
    """Bytes a converted model needs on the device, by part, against the profile's budget."""

    target: str
    format: str
    scheme: str
    max_context: int
    parameters: int
    weights_bytes: int
    kv_cache_bytes: int
    activations_bytes: int
    runtime_bytes: int  # the runtime process itself (RUNTIME_BASE_BYTES)
    copies_bytes: int  # the runtime's working copies of the weights (weight_copies_bytes)
    budget_bytes: int
    memory_mb: int
    usable_fraction: float
    kv_cache: str = "fp32"  # the KV cache's element type

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.copies_bytes + self.kv_cache_bytes + self.activations_bytes
                + self.runtime_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.total_bytes

    def summary(self) -> str:
        return (f"{self.parameters / 1e6:.1f} M parameters at {self.scheme} with max_context {self.max_context} "
                f"need ~{_mb(self.total_bytes)} as {self.format} (weights {_mb(self.weights_bytes)}, the "
                f"runtime's copies of them {_mb(self.copies_bytes)}, "
                f"{self.kv_cache} KV cache {_mb(self.kv_cache_bytes)}, "
                f"activations {_mb(self.activations_bytes)}, runtime {_mb(self.runtime_bytes)}); {self.target} "
                f"allows {_mb(self.budget_bytes)} ({self.usable_fraction:.0%} of {self.memory_mb} MB)")


def _mb(n: float) -> str:
    return f"{n / MB:,.0f} MB"


def _linear_bytes(out_features: int, in_features: int, scheme: str, group_size: int) -> int:
    n = out_features * in_features
    bits = _WEIGHT_BITS[scheme]
    if bits == 32:
        return 4 * n
    if bits == 8:  # int8, one scale per output channel
        return n + SCALE_BYTES * out_features
    groups = -(-in_features // group_size)  # int4, one scale per group of group_size inputs
    return n // 2 + SCALE_BYTES * out_features * groups


def weights_bytes(cfg: ModelConfig, scheme: str, group_size: int = 32) -> int:
    """Bytes of the weights as stored for ``scheme``.

    Linear layers take the scheme's width (fp32 4 B/param; 8-bit 1 B + a scale per output
    channel; 4-bit 0.5 B + a scale per group). The token embedding is a lookup table: fp32 for
    ``fp32``, else 8-bit per row whatever the linear width (4-bit lookups cost more quality
    than they save). A tied output head is stored once in fp32 but twice under a quantized
    scheme (the 8-bit lookup table and the head as a quantized linear need different
    layouts). Norm weights and biases stay fp32.
    """
    d, hd, v = cfg.dim, cfg.head_dim, cfg.vocab_size
    total = 4 * v * d if scheme == "fp32" else v * d + SCALE_BYTES * v
    if not (cfg.tie_embeddings and scheme == "fp32"):
        total += _linear_bytes(v, d, scheme, group_size)
    norm = 4 * d * (2 if cfg.layer_norm else 1)  # weight (and LayerNorm's bias)
    total += norm  # final norm
    if cfg.learned_positions:  # GPT-2's position table: a lookup like the token embedding
        total += 4 * cfg.max_context * d if scheme == "fp32" else cfg.max_context * (d + SCALE_BYTES)
    for i, (h, kv, f) in enumerate(zip(cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, strict=True)):
        for name in cfg.block_linears(i):
            in_f, out_f = cfg.linear_shape(name)
            total += _linear_bytes(out_f, in_f, scheme, group_size)
        total += (4 if cfg.sandwich_norm else 2) * norm + (4 * 2 * hd if cfg.qk_norm else 0)
        if cfg.qkv_bias:
            total += 4 * (h + 2 * kv) * hd
        if cfg.o_bias:
            total += 4 * d
        if cfg.mlp_bias:
            total += 4 * ((2 if cfg.gated_mlp else 1) * f + d)
    return total


def weight_copies_bytes(cfg: ModelConfig, fmt: str, scheme: str, group_size: int = 32,
                        signatures: int = 3) -> int:
    """Bytes of the runtime's own copies of the weights, on top of the model file's.

    Each runtime rearranges the weights for its kernels. Measured as the peak RSS of
    SmolLM2-135M bundles after a chat prompt and 8 tokens, less the runtime process, the file's
    weights, the KV cache and the activations:

    * ``pte``: XNNPACK packs every delegated weight once (prefill and decode share the copy
      through its weight cache) and frees the constants it packed: 0.54x the weights at fp32,
      0.07-0.29x quantized.
    * ``onnx``: ONNX Runtime pre-packs fp32 matmul weights (0.48x); the quantized matmuls read
      the file's weights. ``w8`` keeps activations float by dequantizing the int8 weights at
      load: a whole fp32 copy.
    * ``tflite``: the Interpreter's XNNPACK delegate packs the weights once per signature
      (``signatures``: decode plus one per prefill length). ``w8`` dequantizes them to fp32
      first and packs that: about two fp32 copies per signature.
    """
    if fmt not in _WEIGHT_COPIES:
        raise TargetError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return _WEIGHT_COPIES[fmt](weights_bytes(cfg, scheme, group_size), weights_bytes(cfg, "fp32"), scheme,
                               signatures)


def _pte_copies(w: int, fp32: int, scheme: str, signatures: int) -> int:
    return int(PTE_PACKED_SHARE["fp32" if scheme == "fp32" else "quantized"] * w)


def _onnx_copies(w: int, fp32: int, scheme: str, signatures: int) -> int:
    return fp32 if scheme == "w8" else int(ONNX_PREPACKED_SHARE["fp32" if scheme == "fp32" else "quantized"] * w)


def _tflite_copies(w: int, fp32: int, scheme: str, signatures: int) -> int:
    return signatures * (2 * fp32 if scheme == "w8" else w)


_WEIGHT_COPIES = {"pte": _pte_copies, "onnx": _onnx_copies, "tflite": _tflite_copies}


def kv_cache_bytes(cfg: ModelConfig, max_context: int, copies: int = 1, kv_cache: str = "fp32",
                   fmt: str = "pte", pte_attention: str = "custom") -> int:
    """K and V caches of every layer, ``max_context`` positions long (the cache is static).

    ``kv_cache``: ``fp32`` (4 B an element) or ``int8`` (1 B an element, plus an fp32 scale per position and
    head, and in a .pte with ExecuTorch's kernels, ``pte_attention == "custom"``, whose rows are asymmetric, an
    int8 zero point). A convolution layer's cache (LFM2) is fp32 either way.
    ``copies``: a tflite bundle keeps one per signature, since each signature's cache inputs are
    its own tensors (the backend brings a prefill signature's copy up to date when it runs)."""
    if kv_cache not in KV_CACHE_DTYPES:
        raise TargetError(f"unknown KV cache type {kv_cache!r}; choose one of: {', '.join(KV_CACHE_DTYPES)}")
    zero_point = fmt == "pte" and pte_attention == "custom"
    row = {"fp32": 4 * cfg.head_dim, "int8": cfg.head_dim + 4 + zero_point}
    per_position = sum(kv * row["fp32" if cfg.is_conv(i) else kv_cache] for i, kv in enumerate(cfg.n_kv_heads))
    return 2 * per_position * max_context * copies


def activations_bytes(cfg: ModelConfig, max_context: int, max_prefill: int) -> int:
    """Peak fp32 activations of one prefill chunk: hidden states, the FFN's two wide
    tensors, attention scores over the whole cache, and one row of logits."""
    s = min(max_prefill, max_context)
    per_token = 4 * cfg.dim + 2 * max(cfg.ffn_dim) + max(cfg.n_heads) * max_context
    return 4 * (s * per_token + cfg.vocab_size)


def estimate_memory(profile: Profile, model_config: ModelConfig, scheme: str | None = None,
                    max_context: int | None = None, fmt: str | None = None,
                    prefill_lengths: tuple[int, ...] | list[int] | None = None,
                    kv_cache: str = "fp32", pte_attention: str | None = None) -> MemoryEstimate:
    """What ``model_config`` needs on ``profile``'s device (defaults: the profile's preferred format,
    scheme, max_context, prefill lengths and .pte attention; an fp32 KV cache)."""
    scheme = scheme or profile.convert.scheme
    fmt = fmt or profile.format
    max_context = profile.convert.max_context if max_context is None else max_context
    if scheme not in SCHEMES:
        raise TargetError(f"unknown scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    if fmt not in FORMATS:
        raise TargetError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if max_context < MIN_CONTEXT:
        raise TargetError(f"max_context must be >= {MIN_CONTEXT}, got {max_context}")
    settings = apply_profile(profile, max_context=max_context, prefill_lengths=prefill_lengths or None)
    max_prefill = settings["max_prefill"]
    signatures = 1 + len({min(n, max_prefill) for n in settings["prefill_lengths"]})
    group = profile.convert.group_size
    return MemoryEstimate(
        target=profile.name, format=fmt, scheme=scheme, max_context=max_context,
        parameters=model_config.num_parameters(), weights_bytes=weights_bytes(model_config, scheme, group),
        kv_cache_bytes=kv_cache_bytes(model_config, max_context, signatures if fmt == "tflite" else 1, kv_cache, fmt,
                                      pte_attention or profile.convert.pte_attention),
        activations_bytes=activations_bytes(model_config, max_context, max_prefill),
        runtime_bytes=RUNTIME_BASE_BYTES[fmt],
        copies_bytes=weight_copies_bytes(model_config, fmt, scheme, group, signatures),
        budget_bytes=profile.device.budget_bytes, memory_mb=profile.device.memory_mb,
        usable_fraction=profile.device.usable_fraction, kv_cache=kv_cache,
    )


def _largest_context(at: Callable[..., MemoryEstimate], scheme: str, below: int) -> int | None:
    """The largest max_context (a multiple of 16, < ``below``) at which ``at(scheme=, ctx=)`` fits, or None."""
    lo, hi = MIN_CONTEXT // 16, (below - 1) // 16
    if hi < lo or not at(scheme=scheme, ctx=lo * 16).fits:
        return None
    while lo < hi:  # memory grows with max_context: binary search
        mid = (lo + hi + 1) // 2
        if at(scheme=scheme, ctx=mid * 16).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo * 16


def _prunable_to(est: MemoryEstimate) -> int:
    """Parameters that would fit at the same format, scheme and max_context (weights and their
    copies scale with parameters)."""
    room = est.budget_bytes - est.kv_cache_bytes - est.activations_bytes - est.runtime_bytes
    per_param = (est.weights_bytes + est.copies_bytes) / est.parameters
    return max(0, int(room / per_param))


def _prune_ideas(at: Callable[..., MemoryEstimate], est: MemoryEstimate) -> tuple[list[str], int]:
    """Parameter counts that would fit at the scheme asked for and at w4a8, at the asked max_context
    or, when the KV cache alone is too big for that, at the longest halved context that leaves room."""
    ctx = est.max_context
    while ctx >= MIN_CONTEXT:
        out = []
        for s in dict.fromkeys((est.scheme, "w4a8")):
            n = _prunable_to(at(scheme=s, ctx=ctx))
            if 0 < n < est.parameters:
                out.append(f"about {_params(n)} parameters at {s}")
        if out:
            return out, ctx
        ctx //= 2
    return [], est.max_context


def _params(n: int) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.0f} M"


def check_memory(profile: Profile, model_config: ModelConfig, scheme: str | None = None,
                 max_context: int | None = None, fmt: str | None = None,
                 prefill_lengths: tuple[int, ...] | list[int] | None = None,
                 kv_cache: str = "fp32", pte_attention: str | None = None) -> MemoryEstimate:
    """Estimate what the model needs on the device and raise :class:`TargetError` if it does not fit.

    Budget: ``device.memory_mb * device.usable_fraction``. Need: weights (see
    :func:`weights_bytes`) + the runtime's copies of them (:func:`weight_copies_bytes`, by format)
    + the KV cache (:func:`kv_cache_bytes`; fp32: ``2 * sum(n_kv_heads * head_dim) * max_context * 4``)
    + activations of one prefill chunk + the runtime process (``RUNTIME_BASE_BYTES``, by format). The
    error says what would fit: the largest max_context, an int8 KV cache (pte, onnx), a smaller scheme,
    another of the profile's formats, or the parameter count to prune to.
    """
    est = estimate_memory(profile, model_config, scheme, max_context, fmt, prefill_lengths, kv_cache, pte_attention)
    if est.fits:
        return est

    def at(scheme: str = est.scheme, ctx: int = est.max_context, fmt: str = est.format,
           kv: str = est.kv_cache) -> MemoryEstimate:
        kv = kv if fmt in INT8_KV_FORMATS else "fp32"  # a .tflite holds no int8 cache
        return estimate_memory(profile, model_config, scheme, ctx, fmt, prefill_lengths, kv, pte_attention)

    ideas = []
    ctx = _largest_context(at, est.scheme, est.max_context)
    if ctx is not None:
        ideas.append(f"--max-context {ctx} (the largest that fits at {est.scheme})")
    else:
        fixed = est.weights_bytes + est.copies_bytes + est.runtime_bytes
        ideas.append(f"no --max-context helps at {est.scheme} (weights and runtime alone need ~{_mb(fixed)})")
    if est.format in INT8_KV_FORMATS and est.kv_cache == "fp32" and at(kv="int8").fits:
        ideas.append(f"--kv-cache int8 (needs ~{_mb(at(kv='int8').total_bytes)})")
    smaller = [s for s in _SMALLER if s != est.scheme and s in FORMAT_SCHEMES[est.format]
               and at(scheme=s).total_bytes < est.total_bytes]
    whole = [s for s in smaller if at(scheme=s).fits]
    shorter = [(s, c) for s in smaller if (c := _largest_context(at, s, est.max_context)) is not None]
    if whole:  # the least lossy scheme that fits the whole context
        ideas.append(f"--scheme {whole[0]} (needs ~{_mb(at(scheme=whole[0]).total_bytes)})")
    elif shorter:
        ideas.append(f"--scheme {shorter[0][0]} with --max-context {shorter[0][1]}")
    elif smaller:
        ideas.append(f"no smaller scheme fits (w4a8 needs ~{_mb(at(scheme='w4a8').total_bytes)})")
    other = [f for f in profile.convert.formats
             if f != est.format and est.scheme in FORMAT_SCHEMES[f] and at(fmt=f).fits]
    if other:  # the same scheme in a runtime that keeps fewer copies (tflite packs per signature)
        ideas.append(f"--format {other[0]} (needs ~{_mb(at(fmt=other[0]).total_bytes)})")
    prune, prune_ctx = _prune_ideas(at, est)
    if prune:
        at_ctx = f" with --max-context {prune_ctx}" if prune_ctx != est.max_context else ""
        ideas.append(f"prune the model to {' or '.join(prune)}{at_ctx} (now {_params(est.parameters)})")
    ideas.append(f"or a target with more memory (your own .toml with extends = \"{profile.name}\" "
                 "and a larger [device] memory_mb)")
    raise TargetError(f"the model does not fit {profile.name}: {est.summary()}. What would fit: "
                      + "; ".join(ideas))
