"""Peak host memory of one LoRA training step of a large-vocabulary LM: the full-logits loss
against the chunked loss of ``lora_tune.tasks.lm_loss`` (what the ``sft`` and ``causal-lm``
tasks use).

    python benchmarks/bench_vocab.py                  # markdown table on stdout (~1-2 minutes on 2 cores)
    python benchmarks/bench_vocab.py --quick          # a 32,000-token vocabulary at 256 x 2, a smoke run
    python benchmarks/bench_vocab.py --json out.json  # also writes the rows and the settings

The model is a tiny Llama built from a config (seeded, no download): 2 layers, hidden 256,
4 heads (2 KV heads), intermediate 688, float32 weights, untied output layer, and Qwen2's
151,936-token vocabulary; LoRA rank 16 (alpha 32) on every linear layer of the blocks (the
output layer is frozen, as by default). One batch of 4 x 1,024 random token ids, every next
token supervised (the worst case for the chunked loss: an ``sft`` batch whose prompts are
masked has fewer rows to chunk).

* **full logits**: ``lm_loss.full_logits_loss``, the computation the tasks did before: the
  model's forward returns logits [4, 1024, 151936] (2.5 GB in float32), the supervised ones are
  gathered and upcast, and ``F.cross_entropy`` sums over them; the backward holds their gradient.
* **chunked**: ``lm_loss.next_token_loss`` with ``LORA_TUNE_LM_LOSS=chunked`` (on this CPU
  machine the same as the default): the body's hidden states of the supervised positions, the
  output layer and the cross-entropy in checkpointed chunks of ``lm_loss.chunk_rows(vocab)`` rows
  (441 for this vocabulary), so one chunk's logits exist at a time.

Each variant runs in a fresh subprocess (``sys.executable``; the parent imports no torch, so
the child's high-water mark starts from nothing): it builds the model and the batch, then runs
one training step: forward, the loss divided by the number of targets, backward. Reported:
``ru_maxrss`` of the child at the end (the process's peak resident memory, imports and model
included), its resident memory just before the step, and the step's own peak above that (the
kernel's ``VmHWM`` high-water mark, reset through ``/proc/self/clear_refs`` just before the
step). Both variants' losses are printed too: they are the same computation. The ratio row is
full logits / chunked.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("full logits", "chunked")
MIB = 2**20


def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def child(variant: str, args: argparse.Namespace) -> dict:
    import resource

    os.environ["LORA_TUNE_LM_LOSS"] = "chunked"
    import torch

    from lora_tune import LoraConfig, inject
    from lora_tune.models.tiny_lm import causal_lm_from_config
    from lora_tune.tasks.lm_loss import chunk_rows, full_logits_loss, next_token_loss, split_reproduces_logits

    torch.set_num_threads(args.threads)
    config = {"model_type": "llama", "vocab_size": args.vocab, "hidden_size": args.hidden,
              "intermediate_size": args.intermediate, "num_hidden_layers": args.layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": args.seq, "tie_word_embeddings": False,
              "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    model = causal_lm_from_config(config, seed=0)
    model.config.use_cache = False
    assert split_reproduces_logits(model)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        inject(model, LoraConfig(rank=16, alpha=32, targets="all-linear"))
    model.train()
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    if variant == "full logits":
        total, count = full_logits_loss(model, inputs, ids)
    else:
        total, count = next_token_loss(model, inputs, ids)
    loss = total / count
    loss.backward()
    seconds = time.perf_counter() - start
    step_peak = _status_kib("VmHWM")
    return {"variant": variant, "loss": float(loss.detach()), "targets": count, "seconds": seconds,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_step_mib": before / 1024, "step_peak_above_mib": (step_peak - before) / 1024,
            "chunk_rows": chunk_rows(args.vocab) if variant == "chunked" else None}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    logits_gib = args.batch * args.seq * args.vocab * 4 / 2**30
    lines = [f"Tiny Llama ({args.layers} layers, hidden {args.hidden}), vocabulary {args.vocab:,}, "
             f"batch {args.batch} x {args.seq} tokens (full float32 logits: {logits_gib:.2f} GiB), "
             f"LoRA r16 all-linear, one training step (forward + backward), {args.threads} thread(s), CPU.", "",
             "| loss computation | peak RSS (ru_maxrss) | RSS before the step | step's peak above it "
             "| step time | loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r["variant"] + (f" ({r['chunk_rows']} rows/chunk)" if r["chunk_rows"] else "")
        lines.append(f"| {name} | {r['ru_maxrss_mib']:,.0f} MiB | {r['rss_before_step_mib']:,.0f} MiB | "
                     f"{r['step_peak_above_mib']:,.0f} MiB | {r['seconds']:.1f} s | {r['loss']:.6f} |")
    full, chunked = rows
    lines.append(f"| **ratio full / chunked** | **{full['ru_maxrss_mib'] / chunked['ru_maxrss_mib']:.1f}x** | "
                 f"{full['rss_before_step_mib'] / chunked['rss_before_step_mib']:.2f}x | "
                 f"**{full['step_peak_above_mib'] / max(chunked['step_peak_above_mib'], 1):.1f}x** | "
                 f"{full['seconds'] / chunked['seconds']:.2f}x | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="vocabulary 32,000, batch 2 x 256 (a smoke run)")
    parser.add_argument("--json", help="also write the rows and settings to this file")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.seq, args.batch = 32_000, 256, 2
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    sizes = [f"--{key}={getattr(args, key)}" for key in ("vocab", "seq", "batch", "hidden", "intermediate",
                                                          "layers", "threads")]
    rows = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *sizes, "--child", variant],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if abs(rows[0]["loss"] - rows[1]["loss"]) > 1e-5 * abs(rows[0]["loss"]):
        raise SystemExit(f"the losses differ: {rows}")
    print(table(rows, args))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "child")}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"settings": settings, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
