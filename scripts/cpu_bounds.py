"""What this CPU allows: the fp32 decode bound and the bf16 speed-up for distillation.

    python scripts/cpu_bounds.py [--threads 2] [--no-distill]

1. Memory: the time to read the source model's fp32 weights once (``torch.sum`` over a tensor
   of that size, median of 7). Every fp32 decode step reads all weights, so 1 / that time
   bounds fp32 decode tokens/s for any runtime.
2. Matmul throughput, fp32 against bf16 (AMX on recent Xeons, BF16 on ARMv8.6).
3. One distillation step on the source model (4 x 128 tokens, teacher + student forward,
   backward, AdamW), fp32 against ``--distill-precision bf16``.
"""

from __future__ import annotations

import argparse
import statistics
import time


def _median_s(fn, runs: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-distill", action="store_true", help="skip the distillation-step timing")
    args = ap.parse_args()

    import torch

    from edgelm.converters.compress.distill import DistillConfig, distill
    from edgelm.converters.compress.prune import parameter_count
    from edgelm.converters.model import build_decoder
    from edgelm.converters.sources import load_source

    torch.set_num_threads(args.threads)
    src = load_source(args.source, max_context=512)
    teacher = build_decoder(src.config, src.state_dict)
    n = parameter_count(teacher)
    weights = torch.ones(n)
    s = _median_s(weights.sum)
    print(f"memory: {args.threads} threads read {n * 4 / 1e6:.0f} MB (the fp32 weights) in {s * 1e3:.1f} ms "
          f"= {n * 4 / s / 1e9:.1f} GB/s -> fp32 decode bound ~{1 / s:.0f} tokens/s")
    del weights

    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        s = _median_s(lambda x=x, y=y: [x @ y for _ in range(200)]) / 200
        print(f"matmul 512x576x1536 {str(dtype).removeprefix('torch.')}: {2 * 512 * 576 * 1536 / s / 1e9:.0f} GFLOPS")

    if args.no_distill:
        return
    data = torch.randint(0, src.config.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0))
    for precision in ("fp32", "bf16"):
        student = build_decoder(src.config, src.state_dict)
        stamps: list[float] = []
        cfg = DistillConfig(steps=8, batch_size=4, seq_len=128, progress=False, eval_every=10 ** 9,
                            checkpoint_every=0, precision=precision)
        distill(teacher, student, data, cfg, on_step=lambda _s, _l, st=stamps: st.append(time.perf_counter()))
        steps = [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])][2:]  # after oneDNN's first-shape set-up
        print(f"distillation step, 4 x 128 tokens, {precision}: {statistics.median(steps):.2f} s "
              f"(median of {len(steps)})")


if __name__ == "__main__":
    main()
