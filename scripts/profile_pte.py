"""Where a .pte bundle's decode step spends its time: an ETDump profile, summed per op.

    python scripts/profile_pte.py BUNDLE [--steps 64] [--threads 2]

Loads the bundle's program with ETDump on (ExecuTorch's pybindings), runs one short prefill
and ``--steps`` decode steps, and prints milliseconds per step for each op (XNNPACK ops
inside the delegate, portable ops outside it) and the delegate calls' own time. Profiling
adds a little per event, so the total is somewhat above `edgelm bench`'s.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()

    import torch
    from executorch.devtools import Inspector
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  llama:: kernels
    from executorch.extension.pybindings import portable_lib
    from executorch.kernels import quantized  # noqa: F401  quantized embedding kernels

    manifest = json.loads((args.bundle / "edgelm.json").read_text())
    if manifest["format"] != "pte":
        raise SystemExit(f"{args.bundle} is a {manifest['format']} bundle, not pte")
    data = manifest["io"].get("data_file")
    portable_lib._unsafe_reset_threadpool(args.threads)
    module = portable_lib._load_for_executorch(str(args.bundle / manifest["model_file"]),
                                               str(args.bundle / data) if data else None, enable_etdump=True)

    def positions(start: int, n: int) -> torch.Tensor:  # the second input (ExecuTorchBackend._inputs)
        return torch.arange(start + n) if manifest["io"].get("position_input") == "length" else torch.tensor([start])

    prompt = 8
    module.run_method("prefill", (torch.arange(1, prompt + 1)[None], positions(0, prompt)))
    t = time.perf_counter()
    for i in range(args.steps):
        module.run_method("decode", (torch.tensor([[5]]), positions(prompt + i, 1)))
    wall = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/profile.etdp"
        module.write_etdump_result_to_file(path, f"{tmp}/debug.bin")
        inspector = Inspector(etdump_path=path)
    total: collections.Counter = collections.Counter()
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for ev in block.events:
            if ev.perf_data is not None:
                total[ev.name] += sum(ev.perf_data.raw)
    calls = args.steps + 1  # the prefill is in the Execute block too
    per_step = total["Method::execute"] / calls
    print(f"{args.bundle}: {args.steps} decode steps ({args.threads} threads), profiling on: "
          f"{per_step:.2f} ms per Method::execute, {wall / args.steps * 1e3:.2f} ms per step from Python; "
          f"ms per step below (the prefill is counted once in {calls} calls)")
    for name, ms in total.most_common(args.top):
        print(f"  {ms / calls:7.3f}  {ms / calls / per_step:6.1%}  {name}")
    groups: collections.Counter = collections.Counter()
    for name, ms in total.items():
        if name in ("Method::execute", "DELEGATE_CALL", "OPERATOR_CALL"):
            continue
        kind = next((k for k in ("QB4W", "QC8W", "F32) GEMM") if k in name), None)
        if kind:
            groups[{"QB4W": "int4 matmuls", "QC8W": "int8 matmuls (LM head in w4a8)",
                    "F32) GEMM": "fp32 matmuls"}[kind]] += ms
        elif "::" in name or name.startswith("native_call"):
            groups["portable ops (custom_sdpa, update_cache, ...)"] += ms
        else:
            groups["other XNNPACK ops"] += ms
    inside = sum(v for k, v in groups.items() if not k.startswith("portable"))
    groups["delegate calls outside any op"] = total["DELEGATE_CALL"] - inside
    print("grouped, ms per step:")
    for name, ms in groups.most_common():
        print(f"  {ms / calls:7.3f}  {ms / calls / per_step:6.1%}  {name}")


if __name__ == "__main__":
    main()
