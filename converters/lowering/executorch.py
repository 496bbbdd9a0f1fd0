"""ExecuTorch lowering: a ``.pte`` with ``prefill`` and ``decode`` methods, XNNPACK-delegated.

``prefill`` takes 2 to ``max_prefill`` tokens and returns the last one's logits. ``decode``
takes 1 to ``MAX_VERIFY`` tokens and returns every position's logits: one token in plain
decoding, a draft model's run in speculative decoding (checked in one pass). One method
for both because XNNPACK packs the weights once per method unless its weight cache is on
(edgelm's runtime turns it on where it can): a separate ``verify`` method would otherwise
hold another copy in memory (540 MB for SmolLM2 at fp32). A dynamic-shape decode measured
as fast as a fixed one-token decode.
The KV cache lives in mutable buffers shared by both methods (``share_mutable_buffers``),
so the runtime never moves it. Attention uses ExecuTorch's ``llama::update_cache`` and
``llama::custom_sdpa`` kernels, which attend only to the filled part of the cache. With
``LowerOptions.attention == "portable"`` it uses plain ATen ops instead (``index_put_`` into the
cache, kept in place by ExecuTorch's reinplace pass, and matmuls and softmax over the filled rows):
the aarch64 build of the llama:: kernels needs ARMv8.2-A and dies with SIGILL on older cores. Its
methods take ``arange(start_pos + S)`` in place of ``[start_pos]`` (``io.position_input``), so the
filled length is a size XNNPACK takes and the attention is delegated (``Decoder.length_input``).

Weights go to a ``.ptd`` file beside the program (ExecuTorch's program-data
separation): the XNNPACK-packed weights and the program's own constants then share
one content-deduplicated store, so a tied embedding / LM head is stored once (the
stock path stores it twice: once for the gather, once inside the XNNPACK blob).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import platform
from pathlib import Path

import torch
from torch.export import Dim, export

from edgelm.converters.lowering import (
    ASYMMETRIC_ROWS,
    FOLDED_DECODE,
    SYMMETRIC_ROWS,
    Lowered,
    LowerOptions,
    register_lowering,
)
from edgelm.converters.quant import quantize_torchao, smooth_activations
from edgelm.errors import ConversionError
from edgelm.runtime.backends.executorch import WEIGHT_KEYS  # io.weight_keys: lets quantized programs share the cache

log = logging.getLogger(__name__)


def _delegation_summary(edge_manager) -> dict[str, int]:
    from executorch.devtools.backend_debug import get_delegation_info

    out = {}
    for name in edge_manager.methods:
        info = get_delegation_info(edge_manager.exported_program(name).graph_module)
        out[name] = {"delegated": info.num_delegated_nodes, "not_delegated": info.num_non_delegated_nodes,
                     "delegates": info.num_delegated_subgraphs}
    return out


DATA_TAG = "edgelm_weights"
MAX_VERIFY = 16  # tokens one ``decode`` call takes: a draft run of up to 15 plus the token before it


def _tag_weights_external(ep, tag: str) -> None:
    """Mark every parameter so XNNPACK writes its packed copy to the ``tag`` data file."""
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in ep.graph_signature.inputs_to_parameters:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = tag


@contextlib.contextmanager
def weight_keys_cover_quantization(counter: list[int]):
    """While lowering, name each quantized XNNPACK weight by its bytes *and* its quantization.

    ExecuTorch's serializer names a constant by the sha256 of its bytes, and XNNPACK's weight cache
    keys packed weights by that name; a quantized weight's scales are a separate constant. Two programs
    with the same int8 codes and different scales would then share one packed copy in a process that
    loads both. This mixes the scales, zero points and layout into the name. Unquantized constants keep
    their plain content hash. ``counter[0]`` counts the weights named this way. Written against
    executorch 1.5's ``NodeVisitor.get_serialized_buffer_index``; where that differs, nothing is patched,
    the count stays 0 and the bundle is not marked (its quantized weights then load without the cache).
    """
    try:
        from executorch.backends.xnnpack.operators import node_visitor as nv

        original = nv.NodeVisitor.get_serialized_buffer_index
        signature = inspect.signature(original)
        real_hashlib = nv.hashlib
    except (ImportError, AttributeError, ValueError, TypeError):
        yield
        return
    if "quant_params" not in signature.parameters:
        yield
        return
    salt = [b""]

    class _Salted:  # stands in for the module's ``hashlib``: only ``sha256`` is used there
        @staticmethod
        def sha256(data=b""):
            return real_hashlib.sha256(bytes(data) + salt[0])

    def describe(q) -> bytes:
        parts = [repr((q.dtype, q.axis, q.qmin, q.qmax, q.per_channel, q.per_channel_group, q.group_size,
                       q.is_dynamic)).encode()]
        for t in (q.scale, q.zp):
            parts.append(t.detach().float().contiguous().numpy().tobytes() if isinstance(t, torch.Tensor)
                         else repr(t).encode())
        return b"|".join(parts)

    def patched(self, *args, **kwargs):
        q = signature.bind(self, *args, **kwargs).arguments.get("quant_params")
        if q is None or q.is_dynamic:  # a float constant, or an activation's own (dynamic) quantization
            return original(self, *args, **kwargs)
        salt[0] = b"|edgelm-quant|" + describe(q)
        try:
            counter[0] += 1
            return original(self, *args, **kwargs)
        finally:
            salt[0] = b""

    nv.hashlib = _Salted
    nv.NodeVisitor.get_serialized_buffer_index = patched
    try:
        yield
    finally:
        nv.NodeVisitor.get_serialized_buffer_index = original
        nv.hashlib = real_hashlib


def tie_output_to_embedding(model) -> None:
    """Keep a tied LM head tied after deep copies/quantization (one tensor, stored once)."""
    if model.cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight


def _int8_sdpa(model, on: bool) -> None:
    """Whether the attention layers of an int8 KV cache attend over the int8 codes with ExecuTorch's quantized
    kernel (True) or dequantize the filled rows for the fp32 kernel (False). See :func:`int8_decode_kernel`."""
    for block in model.layers:
        block.attn.int8_sdpa = on


def int8_decode_kernel(architecture: str | None) -> bool:
    """Whether an int8 KV cache's decode attends with ``llama::custom_quantized_sdpa`` on ``architecture``.

    Its int8 matmuls are torchao's, with NEON dot-product kernels on aarch64 and a scalar fallback elsewhere.
    On this x86 host the fallback was 1.6x slower than dequantizing the filled rows and running the fp32
    kernel (30 SmolLM2-shaped layers at position 2000, 2 threads: 60 against 38 ms a step;
    scripts/attention_threads.py), so x86 bundles dequantize; aarch64 bundles keep ExecuTorch's own choice,
    the quantized kernel. Prefill dequantizes everywhere: the quantized kernel made a 3300-token prefill 6x
    slower here. ``None``: this machine.
    """
    return (architecture or platform.machine()) in ("aarch64", "arm64")


def _memory_planning_pass():
    """ExecuTorch's memory planning with the KV cache buffers shared by both methods, and without a second
    copy of the cache in the activation arena.

    An in-place write into a cache buffer (the portable attention's ``index_put_``) is also the graph output
    for that buffer's mutation. ExecuTorch aliases the write's result onto the buffer, but the output node
    keeps the spec it had before, so the planner also allocates every buffer mutation as a graph output in
    the activation arena: space that nothing reads (the emitted program does not return buffer mutations),
    but the runtime still allocates. For SmolLM2 at a context of 2048 that was 94 MB in each method, the size
    of the whole cache. The subclass points those output entries at the buffers' own specs
    first, which the shared-buffer planning places once, outside the arena.
    """
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.tensor import TensorSpec

    class SharedCachePlanning(MemoryPlanningPass):
        def run(self, graph_module, graph_signature=None):
            if graph_signature is not None:
                mutated = set(graph_signature.buffers_to_mutate)  # output names of the buffer mutations
                for node in graph_module.graph.nodes:
                    if node.op == "output" and isinstance(node.meta.get("spec"), (list, tuple)):
                        specs = list(node.meta["spec"])
                        for i, arg in enumerate(node.args[0]):
                            buffer = _written_buffer(arg) if getattr(arg, "name", None) in mutated else None
                            if buffer is not None and isinstance(buffer.meta.get("spec"), TensorSpec):
                                specs[i] = buffer.meta["spec"]
                        node.meta["spec"] = type(node.meta["spec"])(specs)
            return super().run(graph_module, graph_signature)

    return SharedCachePlanning(alloc_graph_input=False, share_mutable_buffers=True)


def _written_buffer(node):
    """The placeholder an in-place op (``Tensor(a!) self``, e.g. ``index_put_``) writes into, or None."""
    if getattr(node, "op", None) != "call_function":
        return None
    schema = getattr(node.target, "_schema", None) or getattr(getattr(node.target, "_op", None), "_schema", None)
    if schema is None or not schema.arguments or schema.arguments[0].alias_info is None \
            or not schema.arguments[0].alias_info.is_write or not node.args:
        return None
    first = node.args[0]
    return first if getattr(first, "op", None) == "placeholder" else None


@register_lowering("pte", ".pte", schemes=("fp32", "w8a8", "w4a8"), kv_caches=("fp32", "int8"))
def lower_executorch(model, out: Path, opts: LowerOptions) -> Lowered:
    """Export ``model`` (a canonical Decoder, fp32 or already quantized) to ``out``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    cfg = model.cfg
    max_prefill = max(2, min(opts.max_prefill, cfg.max_context))
    portable = opts.attention == "portable"  # an int8 cache with it: symmetric rows, see Attention._attend_portable
    m = copy.deepcopy(model).make_stateful("portable" if portable else "executorch", opts.kv_cache)
    tie_output_to_embedding(m)
    m.eval()
    quant_report = None
    quantized_decode = opts.kv_cache == "int8" and not portable and int8_decode_kernel(opts.architecture)
    if opts.quant.quantized or opts.kv_cache == "int8":
        import executorch.kernels.quantized  # noqa: F401  out-variants of the quantized embedding and KV rows
    if opts.quant.quantized:
        smoothing = None
        if opts.quant.smooth:
            smoothing = smooth_activations(model, m, opts.calibration, opts.quant.smooth)
        quant_report = quantize_torchao(m, opts.quant)
        if smoothing:
            quant_report["smoothing"] = smoothing
    seq = Dim("seq", min=2, max=max_prefill)
    max_verify = max(2, min(MAX_VERIFY, cfg.max_context))
    two = torch.zeros(1, 2, dtype=torch.long)
    pos, pos_shape = torch.tensor([0], dtype=torch.long), None
    if portable:  # input_pos: the positions in use after the call, whose length XNNPACK takes (Decoder.length_input)
        m.length_input = True
        pos, pos_shape = torch.arange(4), {0: Dim("length", min=1, max=cfg.max_context)}

    def export_method(steps: Dim):  # portable: S <= length relates two dims, a runtime check, not an export error
        return export(m, (two, pos), dynamic_shapes=({1: steps}, pos_shape), strict=False,
                      prefer_deferred_runtime_asserts_over_guards=portable)

    with torch.no_grad():
        try:
            _int8_sdpa(m, False)  # an int8 cache's prefill attends over dequantized rows
            programs = {"prefill": export_method(seq)}
            _int8_sdpa(m, quantized_decode)
            m.full_logits = True
            programs["decode"] = export_method(Dim("step", min=1, max=max_verify))
        except Exception as e:  # torch.export raises many types; surface them as one
            raise ConversionError(f"torch.export failed: {e}") from e
        finally:
            m.full_logits = False
            _int8_sdpa(m, True)
        for ep in programs.values():
            _tag_weights_external(ep, DATA_TAG)
        keyed = [0]
        with weight_keys_cover_quantization(keyed):
            edge = to_edge_transform_and_lower(
                programs,
                partitioner=[XnnpackPartitioner()],
                compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
                constant_methods={"max_context": cfg.max_context, "max_prefill": max_prefill,
                                  "max_verify": max_verify, "vocab_size": cfg.vocab_size},
            )
        delegation = _delegation_summary(edge)
        et = edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=True,
            run_reinplace_pass=portable,  # write_rows' index_put stays in place
            memory_planning_pass=_memory_planning_pass(),
            external_constants=lambda node: DATA_TAG,
        ))
    with open(out, "wb") as f:
        et.write_to_file(f)
    et.write_tensor_data_to_file(str(out.parent))
    data = out.parent / f"{DATA_TAG}.ptd"
    if not data.is_file():
        raise ConversionError(f"ExecuTorch did not write the weight file {data.name}")
    final_data = out.with_suffix(".ptd")
    if data != final_data:
        data.replace(final_data)
    log.info("wrote %s (%.1f MB) + %s (%.1f MB); delegation %s", out, out.stat().st_size / 1e6,
             final_data.name, final_data.stat().st_size / 1e6, delegation)
    io = {"methods": ["prefill", "decode"], "max_prefill": max_prefill, "min_prefill": 2,
          "max_verify": max_verify,
          "kv_cache": "mutable_buffers", "kv_cache_dtype": opts.kv_cache, "data_file": final_data.name,
          "attention": opts.attention}  # "portable": the runtime need not load the llama:: kernels
    if portable:  # the methods' second input: arange(start_pos + S), not [start_pos]
        io["position_input"] = "length"
    if opts.kv_cache == "int8" and portable:
        io["kv_cache_decode"], io["kv_cache_rows"] = FOLDED_DECODE, SYMMETRIC_ROWS
    elif opts.kv_cache == "int8":
        io["kv_cache_decode"] = "int8 codes" if quantized_decode else "dequantized rows"
        io["kv_cache_rows"] = ASYMMETRIC_ROWS
    if keyed[0] or not opts.quant.quantized:
        io["weight_keys"] = WEIGHT_KEYS
    report = {"delegation": delegation}
    if quant_report:
        report["quantization"] = quant_report
    return Lowered(out, io, report)
