"""Knowledge distillation: the uncompressed model (teacher) trains the compressed one (student).

Loss per step (Hinton et al. 2015; the hidden-state term after TinyBERT / Minitron):

    T^2 * KL(softmax(z_t / T) || softmax(z_s / T))          soft labels, every position
  + ce  * CE(z_s, next token)                              optional hard labels
  + mse * mean_l ||h_s(l) - h_t(map(l))||^2 / mean ||h_t||^2  optional hidden states

AdamW with linear warm-up and cosine decay, gradient clipping, held-out evaluation every N
steps (KL to the teacher, top-1 agreement, perplexity). The training state (student weights,
optimizer, scheduler, step, RNG, evaluation history) is checkpointed; a run pointed at a
folder that holds a checkpoint resumes from it, and Ctrl-C saves one before stopping.
Batches are a pure function of (seed, step), so a resumed run sees the same data as an
uninterrupted one.

Training text is the user's files, or sequences the teacher generates from varied seeded
prompts (data-free distillation). Never the held-out evaluation text.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgelm.converters.compress import CompressionError
from edgelm.converters.compress.importance import forward_full
from edgelm.converters.compress.prune import apply_masks
from edgelm.converters.model import Decoder

log = logging.getLogger(__name__)
STATE_FILE = "distill-state.pt"


@dataclass
class DistillConfig:
    steps: int = 400
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int | None = None  # default: 5% of the steps (at least 1)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    temperature: float = 2.0
    ce_weight: float = 0.0
    hidden_mse_weight: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 50
    checkpoint_every: int = 50
    seed: int = 0
    train_embeddings: bool = False  # the (tied) embedding is the largest matrix; frozen by default
    # "bf16": forward passes under CPU autocast to bfloat16 (AMX on recent Xeons, BF16 on ARMv8.6);
    # weights, gradients, optimizer state and the loss stay fp32.
    precision: str = "fp32"
    progress: bool = True


@dataclass
class DistillResult:
    steps: int
    resumed_from: int
    wall_s: float
    tokens: int
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluations: step, kl, top1, ppl
    losses: list[float] = field(default_factory=list)  # training loss of the steps run in this call


# ---- evaluation -----------------------------------------------------------------------------

@torch.no_grad()
def teacher_targets(teacher: Decoder, windows: list[list[int]]) -> list[torch.Tensor]:
    """Teacher log-probabilities on each held-out window (computed once per run)."""
    return [F.log_softmax(forward_full(teacher, torch.tensor([w]))[0].double(), -1).float() for w in windows]


@torch.no_grad()
def evaluate(student: Decoder, windows: list[list[int]], teacher_logp: list[torch.Tensor]) -> dict[str, float]:
    """Mean KL(teacher || student), greedy top-1 agreement and both perplexities on ``windows``."""
    was_training = student.training
    student.eval()
    kl, top1, nll_s, nll_t = [], [], [], []
    for w, ref in zip(windows, teacher_logp):
        got = F.log_softmax(forward_full(student, torch.tensor([w]))[0].double(), -1)
        ref = ref.double()
        kl.append((ref.exp() * (ref - got)).sum(-1))
        top1.append((ref.argmax(-1) == got.argmax(-1)).double())
        nxt = torch.tensor(w[1:])
        nll_s.append(-got[torch.arange(len(nxt)), nxt])
        nll_t.append(-ref[torch.arange(len(nxt)), nxt])
    student.train(was_training)
    return {"kl": float(torch.cat(kl).mean()), "top1": float(torch.cat(top1).mean()),
            "ppl": float(torch.cat(nll_s).mean().exp()), "ppl_teacher": float(torch.cat(nll_t).mean().exp())}


# ---- training data --------------------------------------------------------------------------

TASKS = [
    "Write a short story about {}.", "Explain {} to a beginner.", "Describe {} in detail.",
    "Give practical advice about {}.", "Write a short essay on {}.", "What are some interesting facts about {}?",
    "Write a friendly letter that mentions {}.", "List the pros and cons of {}.",
    "How would you teach a child about {}?",
    "Write a blog post about {}.", "Summarize the history of {}.", "Write a dialogue between two friends about {}.",
]
TOPICS = [  # disjoint from the prompts of the built-in held-out text (scripts/make_eval_data.py)
    "the ocean tides", "a small mountain village", "cooking rice", "the moon landing", "steam trains",
    "growing tomatoes", "friendship", "volcanoes", "a rainy afternoon", "ancient Rome", "piano lessons",
    "electric cars", "recycling", "the internet", "a birthday party", "deserts", "owls", "saving money",
    "public transport", "chess openings", "the human heart", "making pottery", "a snowstorm", "first jobs",
    "clocks", "coffee", "the Olympic games", "sleep", "maps and navigation", "museums", "a farmers' market",
    "kindness", "earthquakes", "learning to swim", "ants", "the printing press", "board games", "bridges",
    "time management", "forests", "a train journey", "the color blue", "penguins", "baking cookies",
]


def seeded_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(TASKS).format(rng.choice(TOPICS)) for _ in range(n)]


def _sample(logits: torch.Tensor, gen: torch.Generator, temperature: float, top_p: float,
            banned: list[int]) -> torch.Tensor:
    logits = logits.double() / temperature
    if banned:
        logits[:, banned] = -math.inf
    probs = torch.softmax(logits, -1)
    sorted_p, idx = probs.sort(-1, descending=True)
    cut = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
    sorted_p[cut] = 0.0
    choice = torch.multinomial(sorted_p, 1, generator=gen)
    return idx.gather(-1, choice)[:, 0]


@torch.no_grad()
def generate_sequences(teacher: Decoder, prompts: list[list[int]], length: int, seed: int = 0,
                       batch: int = 16, temperature: float = 0.8, top_p: float = 0.95,
                       banned: list[int] | None = None, progress: Callable[[int], None] | None = None
                       ) -> list[list[int]]:
    """Sample ``length`` new tokens after each prompt (batched, KV cache); return the new tokens.

    Prompts of different lengths share one batch: the shortest common prefix is prefilled,
    then every step feeds each row its next prompt token while it has one, else its sample.
    ``banned`` tokens (end of turn) are never sampled, so every sequence is full length."""
    gen = torch.Generator().manual_seed(seed)
    teacher.eval()
    out: list[list[int]] = []
    window = teacher.window_attention
    teacher.window_attention = True
    try:
        for k in range(0, len(prompts), batch):
            rows = prompts[k:k + batch]
            b, p0 = len(rows), min(len(r) for r in rows)
            total = max(len(r) for r in rows) + length
            if total > teacher.cfg.max_context:
                raise CompressionError(f"prompt + {length} tokens exceed the context of {teacher.cfg.max_context}")
            caches = [(torch.zeros(b, blk.attn.n_kv, total, blk.attn.hd),
                       torch.zeros(b, blk.attn.n_kv, total, blk.attn.hd)) for blk in teacher.layers]

            def step(tokens, pos, caches=caches):
                logits, new = teacher(tokens, torch.tensor([pos]), caches)
                for (kc, vc), (kn, vn) in zip(caches, new):
                    kc[:, :, pos:pos + tokens.shape[1]] = kn
                    vc[:, :, pos:pos + tokens.shape[1]] = vn
                return logits

            logits = step(torch.tensor([r[:p0] for r in rows]), 0)
            seqs = [list(r) for r in rows]
            for pos in range(p0, total):
                sampled = _sample(logits, gen, temperature, top_p, banned or [])
                nxt = [r[pos] if pos < len(r) else int(sampled[j]) for j, r in enumerate(rows)]
                for j, t in enumerate(nxt):
                    if pos >= len(rows[j]) and len(seqs[j]) < len(rows[j]) + length:
                        seqs[j].append(t)
                if pos + 1 < total:
                    logits = step(torch.tensor(nxt)[:, None], pos)
            out += [s[len(r):] for s, r in zip(seqs, rows)]
            if progress:
                progress(len(rows))
    finally:
        teacher.window_attention = window
    return out


def chat_prompt_ids(tokenizer_json: str, special_tokens: dict, chat_template: str | None,
                    prompts: list[str]) -> list[list[int]]:
    """Token ids of ``prompts``, wrapped in the model's chat template when it has one."""
    from edgelm.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(tokenizer_json, encoding="utf-8")
        tok = Tokenizer(path, special_tokens, chat_template)
        if chat_template:
            return [tok.encode_chat([{"role": "user", "content": p}]) for p in prompts]
        return [tok.encode(p) for p in prompts]


# ---- the training loop ----------------------------------------------------------------------

def _batch(data: torch.Tensor, step: int, cfg: DistillConfig) -> torch.Tensor:
    """Batch of step ``step``: a pure function of (seed, step), so resuming sees the same data."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    rows = torch.randint(0, data.shape[0], (cfg.batch_size,), generator=gen)
    span = data.shape[1] - cfg.seq_len
    starts = torch.randint(0, span + 1, (cfg.batch_size,), generator=gen) if span > 0 else torch.zeros(
        cfg.batch_size, dtype=torch.long)
    return torch.stack([data[r, s:s + cfg.seq_len] for r, s in zip(rows.tolist(), starts.tolist())])


def lr_lambda(cfg: DistillConfig) -> Callable[[int], float]:
    warmup = cfg.warmup if cfg.warmup is not None else max(1, cfg.steps // 20)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def _hidden_hooks(model: Decoder, store: dict[int, torch.Tensor]):
    def make(i):
        def hook(_mod, _args, out):
            store[i] = out[0]
        return hook
    return [blk.register_forward_hook(make(i)) for i, blk in enumerate(model.layers)]


def _save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def distill(teacher: Decoder, student: Decoder, data: torch.Tensor, cfg: DistillConfig, *,
            eval_windows: list[list[int]] | None = None, checkpoint_dir: str | Path | None = None,
            layer_map: list[int] | None = None, masks: dict[str, torch.Tensor] | None = None,
            on_step: Callable[[int, float], None] | None = None) -> DistillResult:
    """Train ``student`` in place to match ``teacher`` on ``data`` ([N, L] token ids, L >= seq_len).

    ``masks`` keep unstructured zeros at zero; ``layer_map[i]`` is the teacher layer student
    layer ``i`` came from (for the hidden-state loss); ``on_step(step, loss)`` is called after
    every step (tests use it to interrupt a run)."""
    if cfg.precision not in ("fp32", "bf16"):
        raise CompressionError(f"distillation precision must be fp32 or bf16, got {cfg.precision!r}")
    if data.ndim != 2 or data.shape[1] < cfg.seq_len:
        raise CompressionError(f"training data must be [N, >= {cfg.seq_len}] tokens, got {list(data.shape)}")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    student.tok_embeddings.weight.requires_grad_(cfg.train_embeddings)
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    history: list[dict[str, Any]] = []
    start = 0
    state_path = Path(checkpoint_dir) / STATE_FILE if checkpoint_dir else None
    student_cfg = student.cfg.to_dict()
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["student_config"] != student_cfg:
            raise CompressionError(f"{state_path} holds a run of another student model; remove it or pick "
                                   "another checkpoint folder")
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start, history = state["step"], state["history"]
        log.info("resuming distillation from %s at step %d", state_path, start)
    teacher_logp = teacher_targets(teacher, eval_windows) if eval_windows else None

    def checkpoint(step: int) -> None:
        if state_path is None:
            return
        _save_state(state_path, {
            "step": step, "student": student.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": _rng_state(), "history": history,
            "config": dataclasses.asdict(cfg), "student_config": student_cfg})

    def run_eval(step: int) -> None:
        if teacher_logp is None or any(h["step"] == step for h in history):
            return
        m = evaluate(student, eval_windows, teacher_logp)
        history.append({"step": step, **m})
        log.info("step %d: held-out KL %.4f, top-1 %.3f, ppl %.3f", step, m["kl"], m["top1"], m["ppl"])

    hidden_s: dict[int, torch.Tensor] = {}
    hidden_t: dict[int, torch.Tensor] = {}
    hooks = []
    if cfg.hidden_mse_weight:
        layer_map = layer_map or list(range(len(student.layers)))
        hooks = _hidden_hooks(student, hidden_s) + _hidden_hooks(teacher, hidden_t)
    t_temp = cfg.temperature
    losses: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    progress = _Bar(cfg.steps, start, enabled=cfg.progress)
    completed = start  # optimizer steps applied so far
    try:
        with progress:
            run_eval(start)
            for step in range(start, cfg.steps):
                t_step = time.perf_counter()
                batch = _batch(data, step, cfg)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                    with torch.no_grad():
                        t_logits = forward_full(teacher, batch).float()
                    s_logits = forward_full(student, batch).float()
                v = s_logits.shape[-1]
                loss = F.kl_div(F.log_softmax(s_logits.reshape(-1, v) / t_temp, -1),
                                F.log_softmax(t_logits.reshape(-1, v) / t_temp, -1),
                                log_target=True, reduction="batchmean") * t_temp ** 2
                if cfg.ce_weight:
                    loss = loss + cfg.ce_weight * F.cross_entropy(s_logits[:, :-1].reshape(-1, v),
                                                                  batch[:, 1:].reshape(-1))
                if cfg.hidden_mse_weight:
                    mse = []
                    for i, j in enumerate(layer_map):
                        ht = hidden_t[j].detach()
                        mse.append(F.mse_loss(hidden_s[i], ht) / ht.pow(2).mean().clamp_min(1e-8))
                    loss = loss + cfg.hidden_mse_weight * torch.stack(mse).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
                apply_masks(student, masks)
                completed = step + 1
                losses.append(float(loss.detach()))
                tokens += batch.numel()
                done = step + 1
                progress.update(done, losses[-1], batch.numel() / (time.perf_counter() - t_step),
                                sched.get_last_lr()[0], history[-1] if history else None)
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    run_eval(done)
                if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                    checkpoint(done)
                if on_step is not None:
                    on_step(done, losses[-1])
    except KeyboardInterrupt:
        checkpoint(completed)  # the steps finished so far; the next call resumes here
        log.warning("distillation interrupted at step %d%s", completed,
                    f"; resume with the same checkpoint folder ({state_path.parent})" if state_path else "")
        raise
    finally:
        for h in hooks:
            h.remove()
        student.eval()
    return DistillResult(steps=cfg.steps, resumed_from=start, wall_s=time.perf_counter() - t0, tokens=tokens,
                         history=history, losses=losses)


class _Bar:
    """Rich progress bar: step, loss, tokens/s, learning rate and the last held-out KL."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(TextColumn("distilling"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=Console(stderr=True), disable=not enabled)
        self._task = self._progress.add_task("distill", total=total, completed=start, info="")

    def __enter__(self) -> _Bar:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, loss: float, tps: float, lr: float, last_eval: dict | None) -> None:
        info = f"loss {loss:.4f}  {tps:,.0f} tok/s  lr {lr:.2e}"
        if last_eval:
            info += f"  held-out KL {last_eval['kl']:.4f} ppl {last_eval['ppl']:.2f}"
        self._progress.update(self._task, completed=step, info=info)
