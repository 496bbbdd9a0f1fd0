"""How ExecuTorch's attention kernels scale with the context and the thread count, alone.

    python scripts/attention_threads.py [--positions 50,200,1000,2000,3500] [--threads 1,2] [--blas default]

Exports a program that is only a model's attention: ``--layers`` layers (default SmolLM2-135M's 30, 9 query
heads on 3 KV heads of 64) each writing one token's K/V row with ``llama::update_cache`` into a cache of
``--context`` rows and attending over it, three ways: ``llama::custom_sdpa`` over an fp32 cache (``fp32``);
``llama::custom_quantized_sdpa`` over an int8 cache (``int8``: the decode of a ``--kv-cache int8`` bundle for
aarch64); and the int8 cache's filled rows dequantized, then ``llama::custom_sdpa`` (``int8 dequantized``: its
prefill, and its decode in a bundle for x86). Each thread count runs in its own process (ExecuTorch has one
thread pool per process), with MKL single-threaded as edgelm's runtime sets it (``--blas default`` leaves
MKL's own threads on, to show why). Prints the median ms of one decode step per position: compare it with a
bundle's decode step (``edgelm run --stats``) to see attention's share.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FILL = 256  # rows written per call while filling the cache


def build(path: Path, kv: str, layers: int, context: int, heads: int, kv_heads: int, head_dim: int) -> None:
    import torch
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from torch.export import export

    from edgelm.converters.model import dequantize_rows, quantize_rows

    class AttentionOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            shape, rows = (1, context, kv_heads, head_dim), (1, context, kv_heads, 1)
            dtype = torch.float32 if kv == "fp32" else torch.int8
            for i in range(layers):
                for name in ("k", "v"):
                    self.register_buffer(f"{name}{i}", torch.zeros(shape, dtype=dtype))
                    if kv != "fp32":
                        self.register_buffer(f"{name}{i}_scales", torch.ones(rows))
                        self.register_buffer(f"{name}{i}_zeros", torch.zeros(rows, dtype=torch.int8))

        def forward(self, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            start = pos[0].item()
            torch._check(start >= 0)
            torch._check(start + q.shape[1] <= context)
            x = q
            for i in range(layers):
                k, v = x[:, :, :kv_heads], x[:, :, kv_heads:2 * kv_heads]
                if kv == "fp32":
                    kc, vc = getattr(self, f"k{i}"), getattr(self, f"v{i}")
                    torch.ops.llama.update_cache(k, kc, start)
                    torch.ops.llama.update_cache(v, vc, start)
                    out = torch.ops.llama.custom_sdpa(x, kc, vc, start, None, 0, True)
                else:
                    caches = [getattr(self, f"{n}{i}{s}") for n in ("k", "v") for s in ("", "_scales", "_zeros")]
                    for new, cache in zip((*quantize_rows(k), *quantize_rows(v)), caches, strict=True):
                        torch.ops.llama.update_cache(new, cache, start)
                    if kv == "int8":
                        qc, qs, qz = quantize_rows(x)
                        kc, ks, kz, vc, vs, vz = caches
                        out = torch.ops.llama.custom_quantized_sdpa(qc, kc, vc, start, None, 0, True, None,
                                                                    qz, qs, kz, ks, vz, vs)
                    else:
                        filled = [c.narrow(1, 0, start + q.shape[1]) for c in caches]
                        keys, values = dequantize_rows(*filled[:3]), dequantize_rows(*filled[3:])
                        out = torch.ops.llama.custom_sdpa(x, keys, values, start, None, 0, True)
                x = out.view(q.shape) + q
            return x

    import executorch.kernels.quantized  # noqa: F401  out-variants of the per-token ops
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  llama:: ops
    from torch.ao.quantization.fx._decomposed import quantized_decomposed_lib  # noqa: F401
    from torch.export import Dim

    ep = export(AttentionOnly().eval(), (torch.randn(1, 2, heads, head_dim), torch.tensor([1])),
                dynamic_shapes=({1: Dim("s", min=1, max=FILL)}, None), strict=False)
    edge = to_edge_transform_and_lower({"forward": ep}, partitioner=[],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False,
                                                                        _skip_dim_order=True))
    et = edge.to_executorch(ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False)))
    path.write_bytes(et.buffer)


def time_steps(path: Path, threads: int, positions: list[int], heads: int, head_dim: int, repeats: int,
               blas: str) -> None:
    """Child process: one thread count, every position; prints ``position ms`` lines."""
    if blas == "edgelm":
        from edgelm.runtime.backends.executorch import single_threaded_blas

        single_threaded_blas()
    import executorch.kernels.quantized  # noqa: F401
    import torch
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    portable_lib._unsafe_reset_threadpool(threads)
    method = Runtime.get().load_program(path).load_method("forward")
    # ExecuTorch leaves mutable buffers uninitialized: write every row a step reads first, FILL at a time
    for start in range(0, max(positions), FILL):
        method.execute([torch.randn(1, min(FILL, max(positions) - start), heads, head_dim), torch.tensor([start])])
    q = torch.randn(1, 1, heads, head_dim)
    for p in sorted(positions):
        args = [q, torch.tensor([p])]
        method.execute(args)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(10):
                method.execute(args)
            times.append((time.perf_counter() - t) / 10 * 1e3)
        print(p, statistics.median(times), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", default="50,200,1000,2000,3500")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--blas", choices=("edgelm", "default"), default="edgelm",
                    help="edgelm: MKL single-threaded, as edgelm's runtime sets it; default: MKL's own threads")
    ap.add_argument("--child", nargs=2, metavar=("PTE", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    positions = [int(p) for p in args.positions.split(",")]
    if max(positions) >= args.context:
        ap.error(f"positions must be below --context {args.context}")
    if args.child:
        time_steps(Path(args.child[0]), int(args.child[1]), positions, args.heads, args.head_dim, args.repeats,
                   args.blas)
        return
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kv in ("fp32", "int8", "int8 dequantized"):
            pte = Path(tmp) / f"attention-{kv.replace(' ', '-')}.pte"
            build(pte, kv, args.layers, args.context, args.heads, args.kv_heads, args.head_dim)
            for threads in args.threads.split(","):
                out = subprocess.run([sys.executable, __file__, "--child", str(pte), threads, *sys.argv[1:]],
                                     capture_output=True, text=True, check=True).stdout
                rows[kv, threads] = dict(line.split() for line in out.splitlines() if line.strip())
    print(f"ms per decode step of {args.layers} attention layers ({args.heads} heads on {args.kv_heads} KV heads "
          f"of {args.head_dim}), median of {args.repeats}, MKL threads: {args.blas}")
    print("| KV cache | threads | " + " | ".join(f"position {p}" for p in positions) + " |")
    print("|---|---:|" + "---:|" * len(positions))
    for (kv, threads), times in rows.items():
        print(f"| {kv} | {threads} | " + " | ".join(f"{float(times[str(p)]):.2f}" for p in positions) + " |")


if __name__ == "__main__":
    main()
