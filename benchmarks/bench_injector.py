"""Benchmark of the core injector on a MiniLM-sized BERT built from config (no download).

    python benchmarks/bench_injector.py            # prints a markdown table
    python benchmarks/bench_injector.py --quick    # fewer repetitions, for a smoke run
    python benchmarks/bench_injector.py --only dora  # the DoRA rows alone

Measured side by side in one process, same LoRA config for lora-tune and PEFT:
* training-step time (forward, loss, backward, AdamW step) of lora-tune vs PEFT (goal <= 1.00x)
  and vs full fine-tuning (goal <= 0.75x);
* the same for DoRA (``use_dora=True`` vs PEFT's ``use_dora=True``, goal <= 1.00x), and what DoRA
  costs over plain LoRA in lora-tune (context);
* inference of the merged lora-tune model (``lora_tune.merge``) vs the base model (goal <= 1.02x);
* bits per parameter of the 4-bit base with double quantization (goal <= 4.13) and of the
  8-bit base (goal <= 8.1), from ``QuantizedWeight.storage_bytes()``.

Timing: fixed thread count (1 by default), warm-up steps, variants interleaved in a shuffled order
in every repetition, median of the per-repetition means. The default clock is the process's CPU
time, which other jobs on a shared machine disturb far less than wall time; ``--clock wall``
measures wall time instead.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

import torch
from torch import nn


def build_bert(seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(num_hidden_layers=6, hidden_size=384, num_attention_heads=12,
                                  intermediate_size=1536, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def randomize_lora(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)


class Trainer:
    """One model + AdamW over its trainable parameters; ``step()`` runs one training step."""

    def __init__(self, name: str, model: nn.Module, batch: dict):
        self.name = name
        self.model = model.train()
        self.batch = batch
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=1e-4)

    def step(self) -> None:
        out = self.model(**self.batch)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


CLOCK = time.process_time  # CPU seconds of this process: robust to other load on a shared machine


def time_interleaved(runners: dict, reps: int, inner: int, warmup: int, seed: int = 0) -> dict[str, float]:
    """Median over ``reps`` of the mean seconds per call, variants interleaved and shuffled."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(reps):
        order = list(runners)
        rng.shuffle(order)
        for key in order:
            t0 = CLOCK()
            for _ in range(inner):
                runners[key]()
            samples[key].append((CLOCK() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def training_rows(targets: list[str], label: str, args, batch: dict) -> list[tuple]:
    import peft

    from lora_tune import LoraConfig, inject

    ours = build_bert()
    inject(ours, LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=targets))
    randomize_lora(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build_bert(), peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=targets))
    randomize_lora(theirs)
    full = build_bert()
    trainers = {t.name: t for t in (Trainer("lora-tune", ours, batch), Trainer("peft", theirs, batch),
                                    Trainer("full", full, batch))}
    if trainers["lora-tune"].trainable != trainers["peft"].trainable:
        raise SystemExit(f"configs differ: {trainers['lora-tune'].trainable} vs {trainers['peft'].trainable} trainable")
    times = time_interleaved({k: t.step for k, t in trainers.items()}, args.reps, args.inner, args.warmup)
    lt, pf, ft = times["lora-tune"], times["peft"], times["full"]
    n = trainers["lora-tune"].trainable
    return [
        (f"train step, {label} (r={args.rank}, {n:,} trainable): lora-tune vs PEFT", lt, pf, "<= 1.00x"),
        (f"train step, {label}: lora-tune vs full fine-tuning", lt, ft, "<= 0.75x"),
        (f"(context) train step, {label}: PEFT vs full fine-tuning", pf, ft, "-"),
    ]


def dora_rows(targets: list[str], label: str, args, batch: dict) -> list[tuple]:
    """DoRA training step, lora-tune vs PEFT (same config, same trainable tensors), and DoRA's cost
    over plain LoRA within lora-tune."""
    import peft

    from lora_tune import LoraConfig, inject

    models = {}
    for name, dora in (("lora-tune DoRA", True), ("lora-tune LoRA", False)):
        models[name] = build_bert()
        inject(models[name], LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=targets, use_dora=dora))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models["PEFT DoRA"] = peft.get_peft_model(build_bert(), peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=targets, use_dora=True))
    for model in models.values():
        randomize_lora(model)
    trainers = {k: Trainer(k, m, batch) for k, m in models.items()}
    if trainers["lora-tune DoRA"].trainable != trainers["PEFT DoRA"].trainable:
        raise SystemExit(f"configs differ: {trainers['lora-tune DoRA'].trainable} vs "
                         f"{trainers['PEFT DoRA'].trainable} trainable")
    times = time_interleaved({k: t.step for k, t in trainers.items()}, args.reps, args.inner, args.warmup)
    ours, theirs, plain = times["lora-tune DoRA"], times["PEFT DoRA"], times["lora-tune LoRA"]
    n = trainers["lora-tune DoRA"].trainable
    return [
        (f"DoRA train step, {label} (r={args.rank}, {n:,} trainable): lora-tune vs PEFT", ours, theirs, "<= 1.00x"),
        (f"(context) DoRA vs plain LoRA train step, {label}, lora-tune", ours, plain, "-"),
    ]


def inference_row(args, batch: dict) -> tuple:
    from lora_tune import LoraConfig, inject, merge

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base = build_bert().eval()
    ours = build_bert().eval()
    inject(ours, LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets="all-linear"))
    randomize_lora(ours)
    merge(ours)

    def run(model):
        def call():
            with torch.no_grad():
                model(**inputs)
        return call

    times = time_interleaved({"merged": run(ours), "base": run(base)}, args.reps, args.inner, args.warmup)
    return ("inference, all-linear adapter merged (lora_tune.merge) vs base model", times["merged"], times["base"],
            "<= 1.02x")


def bits_rows() -> list[tuple]:
    from lora_tune import LoraConfig, inject
    from lora_tune.lora.quant import QuantizedWeight

    rows = []
    for bits, dq, goal in ((4, True, 4.13), (4, False, None), (8, True, 8.1)):
        model = build_bert()
        inject(model, LoraConfig(rank=8, targets="all-linear", quant_bits=bits, double_quant=dq))
        qs = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
        stored = sum(q.storage_bytes() for q in qs)
        numel = sum(torch.Size(q.shape).numel() for q in qs)
        per_layer = max(q.bits_per_parameter() for q in qs)
        kind = (" nf4 + double quant" if dq else " nf4, no double quant") if bits == 4 else " (int8 + row scale)"
        label = f"{bits}-bit base{kind}"
        rows.append((label, 8.0 * stored / numel, per_layer, goal, len(qs), numel))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="reps=3, inner=1: a smoke run, not a measurement")
    ap.add_argument("--only", choices=["all", "lora", "dora"], default="all",
                    help="lora: the LoRA, inference and bits rows; dora: the DoRA rows")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: process CPU time (default; with --threads 1 it counts the same work as wall time); "
                         "wall: perf_counter")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.quick:
        args.reps, args.inner, args.warmup = 3, 1, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 30522, (args.batch, args.seq)),
             "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
             "labels": torch.randint(0, 2, (args.batch,))}

    rows = []
    if args.only in ("all", "lora"):
        rows += training_rows(["query", "value"], "q,v", args, batch)
        rows += training_rows(["query", "key", "value", "dense"], "all-linear", args, batch)
        rows.append(inference_row(args, batch))
    if args.only in ("all", "dora"):
        rows += dora_rows(["query", "value"], "q,v", args, batch)
        rows += dora_rows(["query", "key", "value", "dense"], "all-linear", args, batch)

    print(f"MiniLM-sized BERT (6 layers, hidden 384, 12 heads, ffn 1536), batch {args.batch}x{args.seq}, "
          f"CPU, torch {torch.__version__}, {args.threads} thread(s), {args.clock} time, median of {args.reps} "
          f"interleaved repetitions x {args.inner} steps after {args.warmup} warm-up steps\n")
    print("| measurement | lora-tune | reference | ratio | goal | met |")
    print("|---|---:|---:|---:|---:|:---:|")
    for label, ours, ref, goal in rows:
        ratio = ours / ref
        met = "-" if goal == "-" else ("yes" if ratio <= float(goal.strip("<= x")) else "no")
        print(f"| {label} | {1000 * ours:.1f} ms | {1000 * ref:.1f} ms | {ratio:.3f}x | {goal} | {met} |")
    if args.only == "dora":
        return
    print("\n| quantized base (all-linear weights of the BERT) | bits/param (all) | worst layer | goal | met |")
    print("|---|---:|---:|---:|:---:|")
    for label, bpp, worst, goal, n_layers, numel in bits_rows():
        met = "-" if goal is None else ("yes" if bpp <= goal else "no")
        print(f"| {label}, {n_layers} weights, {numel:,} params | {bpp:.4f} | {worst:.4f} | "
              f"{'-' if goal is None else f'<= {goal}'} | {met} |")


if __name__ == "__main__":
    main()
