"""Compress the real SmolLM2-135M-Instruct to <= 70% of its parameters, distill, and measure.

Rows (held-out perplexity and greedy top-1 agreement against the unpruned fp32 model, on the
built-in held-out text, which no step trains or calibrates on):

  fp32            the unpruned model
  low-rank only   truncated SVD of the block linears at --low-rank-energy (only where smaller)
  unstructured    --sparsity magnitude sparsity per matrix (same parameter count: dense zeros)
  pruned          --drop-layers whole layers + --prune-ffn of every FFN (+ --prune-heads)
  distilled       the pruned model after --minutes of knowledge distillation

Parameters are all parameters with the tied embedding / LM head counted once.

    python scripts/compress_smollm2.py --json /tmp/compress_smollm2.json

Defaults are the measured recipe: 256 teacher-generated sequences plus the calibration text,
400 steps of 8 x 128 tokens, bf16 forward passes (pass --precision fp32 on CPUs without
AMX or ARM BF16). --minutes sizes the step count from a timed trial step instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from edgelm.converters.compress.distill import (
    DistillConfig,
    chat_prompt_ids,
    distill,
    evaluate,
    generate_sequences,
    seeded_prompts,
    teacher_targets,
)
from edgelm.converters.compress.lowrank import low_rank
from edgelm.converters.compress.prune import magnitude_prune, parameter_count, structured_prune
from edgelm.converters.compress.recipe import TextTokenizer
from edgelm.converters.evaluate import load_texts, token_windows
from edgelm.converters.model import build_decoder
from edgelm.converters.sources import load_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--drop-layers", type=int, default=3)
    ap.add_argument("--prune-ffn", type=float, default=0.417)
    ap.add_argument("--prune-heads", type=float, default=0.0)
    ap.add_argument("--low-rank-energy", type=float, default=0.9)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--minutes", type=float, default=None, help="size the distillation to this time budget instead")
    ap.add_argument("--steps", type=int, default=400, help="distillation steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="distillation forward precision")
    ap.add_argument("--hidden-mse", type=float, default=0.0, help="weight of the hidden-state loss")
    ap.add_argument("--data", default=None, help="training text (default: the built-in calibration text)")
    ap.add_argument("--generate", type=int, default=256,
                    help="also train on N sequences the teacher generates from seeded prompts (data-free)")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--checkpoint", default="/tmp/compress_smollm2.distill", help="resumable training state")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--skip-baselines", action="store_true", help="no low-rank-only / unstructured-only rows")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("transformers", "torch", "torchao"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    t0 = time.perf_counter()
    src = load_source(args.source, max_context=512)
    tok = TextTokenizer(src.tokenizer_json)
    windows = token_windows(tok, load_texts(None, "eval"), 128, args.eval_windows)
    calib = token_windows(tok, load_texts(None, "calibration"), 128, 16)
    train_texts = load_texts(args.data, "calibration")
    train = torch.tensor(token_windows(tok, train_texts, args.seq_len, 1 << 30))
    teacher = build_decoder(src.config, src.state_dict)
    ref = teacher_targets(teacher, windows)
    if args.generate:
        t = time.perf_counter()
        ids = chat_prompt_ids(src.tokenizer_json, src.special_tokens, src.chat_template,
                              seeded_prompts(args.generate, 0))
        gen = generate_sequences(teacher, ids, args.seq_len, seed=0, batch=32,
                                 banned=src.special_tokens.get("eos_token_ids") or src.config.eos_token_ids)
        train = torch.cat([train, torch.tensor(gen)])
        print(f"generated {len(gen)} x {args.seq_len} tokens with the teacher in {time.perf_counter() - t:.0f} s; "
              f"{train.shape[0]} training sequences in all", flush=True)
    rows = []

    def row(name: str, model, extra: str = "") -> dict:
        m = evaluate(model, windows, ref)
        r = {"row": name, "params": parameter_count(model), "ppl": m["ppl"], "top1": m["top1"], "kl": m["kl"],
             "note": extra}
        rows.append(r)
        print(f"ROW {name}: params {r['params'] / 1e6:.2f} M ({r['params'] / rows[0]['params'] if rows else 1:.1%}), "
              f"ppl {r['ppl']:.3f}, top-1 {r['top1']:.3f}, KL {r['kl']:.4f} {extra}", flush=True)
        return r

    row("fp32 (unpruned)", teacher)
    if not args.skip_baselines:
        cfg, sd, rep = low_rank(src.config, src.state_dict, energy=args.low_rank_energy, multiple_of=32)
        row(f"low-rank only (energy {args.low_rank_energy})", build_decoder(cfg, sd),
            f"{rep['factored']}/{rep['considered']} linears factored")
        sparse = build_decoder(src.config, src.state_dict)
        _, rep = magnitude_prune(sparse, args.sparsity, "layer")
        row(f"unstructured only ({args.sparsity:.0%} per matrix)", sparse,
            f"achieved {rep['achieved']:.1%} of block linears; dense zeros, not faster on dense runtimes")
        del sparse
    cfg, sd, layer_map, prep = structured_prune(src.config, src.state_dict, calib, drop=args.drop_layers,
                                                heads=args.prune_heads, ffn=args.prune_ffn)
    student = build_decoder(cfg, sd)
    pruned = row("pruned", student, f"dropped layers {prep.get('dropped_layers')}, ffn {sorted(set(cfg.ffn_dim))}, "
                 f"heads {sorted(set(cfg.n_heads))}")
    assert pruned["params"] <= 0.70 * rows[0]["params"], "pruning must reach <= 70% of the parameters"

    steps = args.steps
    if args.minutes:  # time two trial steps on a copy, then size the run to the budget
        trial = copy.deepcopy(student)
        tc = DistillConfig(steps=2, batch_size=args.batch, seq_len=args.seq_len, progress=False, eval_every=10 ** 9,
                           checkpoint_every=0, precision=args.precision)
        times = []
        distill(teacher, trial, train, tc, on_step=lambda s, _loss: times.append(time.perf_counter()))
        step_s = times[1] - times[0]
        steps = max(10, int(args.minutes * 60 / (step_s * 1.08)))  # ~8% for the evaluations
        print(f"trial step {step_s:.1f} s -> {steps} steps for {args.minutes} min", flush=True)
        del trial
    dcfg = DistillConfig(steps=steps, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr,
                         warmup=max(2, steps // 20), temperature=args.temperature, eval_every=max(5, steps // 4),
                         precision=args.precision, hidden_mse_weight=args.hidden_mse,
                         checkpoint_every=max(5, steps // 10), progress=False)
    result = distill(teacher, student, train, dcfg, eval_windows=windows, checkpoint_dir=args.checkpoint,
                     layer_map=layer_map)
    for h in result.history:
        print(f"  step {h['step']}: held-out KL {h['kl']:.4f}, top-1 {h['top1']:.3f}, ppl {h['ppl']:.3f}", flush=True)
    distilled = row("pruned + distilled", student,
                    f"{steps} steps x {args.batch}x{args.seq_len} tokens, {result.wall_s / 60:.1f} min")
    lost = pruned["ppl"] - rows[0]["ppl"]
    recovered = (pruned["ppl"] - distilled["ppl"]) / lost if lost > 0 else float("nan")

    print("\n| model | params (M) | % of fp32 | held-out ppl | top-1 vs fp32 | KL | note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['row']} | {r['params'] / 1e6:.2f} | {r['params'] / rows[0]['params']:.1%} | {r['ppl']:.3f} "
              f"| {r['top1']:.3f} | {r['kl']:.4f} | {r['note']} |")
    print(f"\ndistillation: {result.wall_s:.0f} s wall for {steps} steps ({result.tokens:,} tokens, "
          f"resumed from step {result.resumed_from}); recovered {recovered:.0%} of the perplexity lost to pruning "
          f"(target >= 50%: {'met' if recovered >= 0.5 else 'NOT met'}); total {time.perf_counter() - t0:.0f} s",
          flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "distill_wall_s": result.wall_s, "steps": steps, "history": result.history,
                       "recovered": recovered, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
