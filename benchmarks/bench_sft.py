"""Benchmark of lora-tune's SFT training step against TRL's SFTTrainer + PEFT, on a tiny Llama
built from a config (seeded, no download) and the project's instruction set.

    python benchmarks/bench_sft.py                   # markdown table on stdout (a few minutes)
    python benchmarks/bench_sft.py --quick           # ~1 minute smoke run, not a measurement
    python benchmarks/bench_sft.py --json out.json   # also writes the rows and the settings
    python benchmarks/bench_sft.py --device cuda     # both sides on a GPU: wall time after a synchronize,
                                                     # no 4-bit memory rows (they measure host RSS)

Both sides train the same thing: the ``sft`` task (``lora_tune.tasks.sft``) on
studies/data/sft/train.jsonl rendered through the tokenizer's chat template, loss on the
assistant turns, padded batches (no packing) of the same examples in the same order; Llama
hidden 256, 4 layers, 4 heads, intermediate 688, the tokenizer's vocabulary; LoRA rank 16,
alpha 32, dropout 0 on q,k,v,o,gate,up,down (312,320 trainable parameters on both sides);
AdamW (torch's, not fused), constant learning rate, gradient clipping at 1.0, no gradient
checkpointing, no evaluation while timing.

* **lora-tune**: ``lora_tune.inject`` + ``lora_tune.train.fit`` on the task's own batches
  (``SFTTask.train_batches``). The task is wrapped so that its batch generator reads the clock
  when it hands a batch to ``fit`` and again when ``fit`` asks for the next one: the interval is
  one optimizer step (to_device, forward, loss, backward, clipping, AdamW, zero_grad, schedule).
* **TRL**: ``trl.SFTTrainer`` with a ``peft.LoraConfig``, given the same examples as a
  pre-tokenized dataset (``input_ids`` + ``labels``, taken from the lora-tune batches) read in
  order (``train_sampling_strategy="sequential"``), so its collator builds the very same tensors
  (checked, batch by batch). A ``TrainerCallback`` reads the clock in ``on_step_begin`` and
  ``on_step_end``, which bracket the same work (batch collation is outside on both sides).

Tokens/s = non-padding input tokens (``attention_mask.sum()``, which is also what
``SFTTask.batch_tokens`` and TRL's ``num_tokens`` count) of the timed steps / their seconds.
Warm-up steps are excluded; each repetition builds fresh models and runs both sides, in
alternating order; the table gives the median over repetitions. Rows for fp32 and for bf16
autocast (lora-tune ``precision: bf16``, TRL ``bf16=True``). The clock is the process's CPU time
with one thread (robust to other jobs on a shared machine), wall time with more.

**4-bit base** (nf4, double quantization, blocksize 64, fp32 compute), each side in a fresh
subprocess: lora-tune ``quant_bits=4`` vs transformers ``BitsAndBytesConfig(load_in_4bit=True)``
(it works on CPU with transformers 5 + bitsandbytes 0.50, so no hand-made ``Linear4bit``
swap is needed) + ``peft.prepare_model_for_kbit_training`` (no checkpointing) +
``get_peft_model``. Both are then trained by the same loop (``fit``) on the same batches, so
only the model differs. Reported: the bytes of the model's parameters, buffers and bitsandbytes
quant states (each tensor once); the peak RSS growth of the training steps (the kernel's
high-water mark, reset through /proc/self/clear_refs after a warm-up forward/backward and
``malloc_trim``; it includes optimizer state, gradients, activations and transients); and the
bytes autograd saves for the backward in one forward. The peak is measured twice: with glibc's
mmap threshold fixed at its initial 128 KiB (the goal row: RSS then follows the memory in use)
and with glibc's default dynamic threshold, whose heap retention depends on what the process did
before training (loading, quantizing) and differs from run to run by tens of MiB.

Goals: lora-tune/TRL tokens/s >= 1.00 (step time <= 1.00x) and 4-bit peak memory <= 1.00x.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lora_tune import LoraConfig, inject
from lora_tune.tasks import build_task
from lora_tune.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "studies" / "data" / "sft"
MODEL_CONFIG = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LEARNING_RATE = 2e-4
SIDES = ("lora-tune", "trl")

CLOCK = time.process_time
DEVICE = "cpu"  # --device: where both sides train (the 4-bit memory rows are CPU-only)


# -- shared data ----------------------------------------------------------------------------

def build_sft_task(max_length: int):
    return build_task({
        "type": "sft", "model": {"config": MODEL_CONFIG}, "tokenizer": str(DATA / "tokenizer"),
        "train_file": str(DATA / "train.jsonl"), "eval_file": str(DATA / "eval.jsonl"), "format": "messages",
        "max_length": max_length, "train_on": "completion", "seed": 0,
    })


def training_batches(task, batch_size: int, n: int) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` full batches ``SFTTask.train_batches`` yields (epoch after epoch)."""
    out: list[dict[str, torch.Tensor]] = []
    epoch = 0
    while len(out) < n:
        out += [b for b in task.train_batches(batch_size, 0, epoch) if len(b["input_ids"]) == batch_size]
        epoch += 1
    return out[:n]


def rows_of(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, list[int]]]:
    """The examples of the batches without their padding, in order (TRL's pre-tokenized rows)."""
    rows = []
    for batch in batches:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            keep = mask.bool()
            rows.append({"input_ids": ids[keep].tolist(), "labels": labels[keep].tolist()})
    return rows


def lora_tune_config(rank: int, quant_bits: int | None = None):
    return LoraConfig(rank=rank, alpha=2.0 * rank, dropout=0.0, targets=[f".{t}" for t in TARGETS],
                      quant_bits=quant_bits, quant_type="nf4", double_quant=True)


def peft_config(rank: int):
    import peft

    return peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(TARGETS),
                           bias="none", task_type="CAUSAL_LM")


def train_config(batch_size: int, precision: str):
    return TrainConfig(epochs=1, batch_size=batch_size, learning_rate=LEARNING_RATE, device=DEVICE,
                       precision=precision, grad_clip=1.0, evals_per_epoch=1, optimizer="adamw",
                       lr_scheduler="constant", seed=0)


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class StepLog:
    """Seconds and non-padding tokens of every optimizer step of one training run."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def timed(self, warmup: int) -> tuple[int, float]:
        return sum(self.tokens[warmup:]), sum(self.seconds[warmup:])


class ComputeDtype:
    """Records the output dtype of the first adapted layer's base in training, to check that
    autocast (or its absence) is the same on both sides."""

    def __init__(self, model: torch.nn.Module):
        base = next(m for n, m in model.named_modules() if n.endswith("q_proj.base_layer"))
        self.seen: set[torch.dtype] = set()
        self.handle = base.register_forward_hook(lambda module, inputs, output: self.seen.add(output.dtype))

    def check(self, side: str, precision: str) -> None:
        self.handle.remove()
        expected = {torch.bfloat16 if precision == "bf16" else torch.float32}
        if self.seen != expected:
            raise SystemExit(f"{side} computed in {self.seen}, expected {expected} for {precision}: "
                             "not a fair comparison")


class TimedTask:
    """The sft task with fixed batches and no evaluation; its batch generator times each step of
    ``fit`` (from handing a batch over to being asked for the next). ``fit`` stops after the last
    batch without asking again, so the last batch's step is not timed: pass one extra."""

    def __init__(self, task, batches: list[dict[str, torch.Tensor]], batch_size: int):
        self._task, self._batches, self._batch_size = task, batches, batch_size
        self.log = StepLog()

    def __getattr__(self, name: str):  # loss, loss_weight, batch_tokens, to_device
        return getattr(self._task, name)

    def num_train_examples(self) -> int:
        return len(self._batches) * self._batch_size

    def train_batches(self, batch_size: int, seed: int, epoch: int):
        for batch in self._batches:
            t0 = CLOCK()
            yield batch
            self.log.seconds.append(CLOCK() - t0)
            self.log.tokens.append(self._task.batch_tokens(batch))

    def evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, float]:
        return {"eval_loss": 0.0}


# -- the two training steps -----------------------------------------------------------------

def run_lora_tune(task, batches, precision: str, args) -> tuple[StepLog, int]:
    model = task.build_model()
    inject(model, lora_tune_config(args.rank))
    timed = TimedTask(task, batches + batches[-1:], args.batch)
    dtype = ComputeDtype(model)
    fit(model, timed, train_config(args.batch, precision))
    dtype.check("lora-tune", precision)
    return timed.log, trainable(model)


def run_trl(task, batches, precision: str, args) -> tuple[StepLog, int]:
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    log = StepLog()
    collate = DataCollatorForLanguageModeling(pad_token_id=task.pad_id)  # what SFTTrainer builds by default here

    def checked_collator(examples):
        batch = collate(examples)
        k = len(log.tokens)
        expected = batches[k]
        for key in ("input_ids", "attention_mask", "labels"):
            if not torch.equal(batch[key], expected[key]):
                raise SystemExit(f"TRL's batch {k} differs from lora-tune's in {key}: the comparison is not fair")
        log.tokens.append(int(batch["attention_mask"].sum()))
        return batch

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = CLOCK()

        def on_step_end(self, args, state, control, **kwargs):
            log.seconds.append(CLOCK() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, max_steps=len(batches), per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", bf16=precision == "bf16", fp16=False,
            gradient_checkpointing=False, max_length=args.max_length, packing=False,
            train_sampling_strategy="sequential", eval_strategy="no", save_strategy="no", logging_strategy="no",
            report_to="none", disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
            use_cpu=DEVICE == "cpu", seed=0)
        trainer = SFTTrainer(model=task.build_model(), args=config, train_dataset=Dataset.from_list(rows_of(batches)),
                             processing_class=task.tokenizer, peft_config=peft_config(args.rank),
                             data_collator=checked_collator, callbacks=[StepClock()])
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training metrics to stdout
        if torch.get_num_threads() != args.threads:
            raise SystemExit(f"SFTTrainer changed torch's threads to {torch.get_num_threads()}")
        dtype = ComputeDtype(trainer.model)
        trainer.train()
        dtype.check("TRL", precision)
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
        plain = not (optimizer.defaults.get("fused") or optimizer.defaults.get("foreach"))
        if type(optimizer) is not torch.optim.AdamW or not plain:
            raise SystemExit(f"TRL trained with {optimizer!r}, not torch's plain AdamW as lora-tune does")
    if len(log.seconds) != len(batches):
        raise SystemExit(f"TRL ran {len(log.seconds)} steps, expected {len(batches)}")
    return log, trainable(trainer.model)


RUNNERS = {"lora-tune": run_lora_tune, "trl": run_trl}


@dataclass
class Throughput:
    precision: str
    tokens_per_second: dict[str, float]
    ms_per_step: dict[str, float]
    runs: dict[str, list[float]]  # tokens/s of every repetition
    tokens_per_step: float
    padded_tokens_per_step: float


def throughput(task, precision: str, args) -> Throughput:
    batches = training_batches(task, args.batch, args.warmup + args.steps)
    runs: dict[str, list[float]] = {s: [] for s in SIDES}
    step_ms: dict[str, list[float]] = {s: [] for s in SIDES}
    counts: dict[str, int] = {}
    for rep in range(args.reps):
        for side in (SIDES if rep % 2 == 0 else SIDES[::-1]):
            gc.collect()
            log, counts[side] = RUNNERS[side](task, batches, precision, args)
            tokens, seconds = log.timed(args.warmup)
            runs[side].append(tokens / seconds)
            step_ms[side].append(1000 * seconds / args.steps)
            print(f"  {precision} rep {rep + 1}/{args.reps} {side:9s} {tokens / seconds:9.0f} tokens/s "
                  f"{1000 * seconds / args.steps:7.1f} ms/step", file=sys.stderr, flush=True)
    if counts["lora-tune"] != counts["trl"]:
        raise SystemExit(f"configs differ: {counts['lora-tune']:,} vs {counts['trl']:,} trainable parameters")
    timed = batches[args.warmup:]
    return Throughput(precision, {s: statistics.median(v) for s, v in runs.items()},
                      {s: statistics.median(v) for s, v in step_ms.items()}, runs,
                      statistics.mean(int(b["attention_mask"].sum()) for b in timed),
                      statistics.mean(b["input_ids"].numel() for b in timed))


# -- 4-bit memory, one fresh process per side -----------------------------------------------

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _release_free_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)  # glibc: hand freed pages back, so growth is new memory


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters, buffers and bitsandbytes quant states (absmax, code tables, nested
    state) of ``model``, each tensor counted once."""
    from bitsandbytes.functional import QuantState

    seen: dict[tuple[int, int], int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            seen[(t.data_ptr(), t.nbytes)] = t.nbytes

    def add_state(qs) -> None:
        for name in ("absmax", "code", "offset"):
            add(getattr(qs, name, None))
        if getattr(qs, "state2", None) is not None:
            add_state(qs.state2)

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    states = {}
    for module in model.modules():
        for value in list(vars(module).values()) + [getattr(p, "quant_state", None) for p in module.parameters(False)]:
            if isinstance(value, QuantState):
                states[id(value)] = value
    for qs in states.values():
        add_state(qs)
    return sum(seen.values())


def quantized_model(side: str, task, rank: int) -> torch.nn.Module:
    if side == "lora-tune":
        model = task.build_model()
        inject(model, lora_tune_config(rank, quant_bits=4))
        return model
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as path:
        task.build_model().save_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu",
                                                     dtype=torch.float32)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return peft.get_peft_model(model, peft_config(rank))


def saved_for_backward(task, model: torch.nn.Module, batch) -> int:
    """Bytes of the tensors autograd keeps from one forward for the backward (each storage once):
    activations, and any weight a layer hands to a matmul that needs it for the input gradient."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task.loss(model, batch)
    loss.backward()
    return sum(storages.values())


def memory_child(side: str, args) -> dict:
    """Runs in a fresh process: weight bytes and peak RSS growth of training one 4-bit model."""
    task = build_sft_task(args.max_length)
    batches = training_batches(task, args.batch, args.mem_steps + 2)
    model = quantized_model(side, task, args.rank)
    weights = model_bytes(model)
    # a warm-up forward and backward keeps one-off lazy allocations (kernel tables, autograd,
    # bitsandbytes) out of the peak
    model.train()
    saved = saved_for_backward(task, model, batches[0])
    model.zero_grad(set_to_none=True)
    _release_free_heap()
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    timed = TimedTask(task, batches[1:], args.batch)
    fit(model, timed, train_config(args.batch, "fp32"))
    peak = _status_kib("VmHWM")
    tokens, seconds = timed.log.timed(1)  # the first step also allocates the optimizer state
    return {"side": side, "weight_bytes": weights, "peak_rss_growth_bytes": 1024 * (peak - base),
            "saved_for_backward_bytes": saved, "trainable": trainable(model),
            "tokens_per_second": tokens / seconds, "steps": len(timed.log.seconds)}


# glibc raises its mmap threshold after each free of an mmapped block, so which allocations are
# later served from the (never shrinking) heap depends on the process's history (loading,
# quantizing), not on the training step. Fixing it makes RSS follow the memory in use.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def memory(args) -> dict[str, dict]:
    """``{"fixed" | "default": {"lora-tune" | "peft": child result}}``: glibc's mmap threshold
    fixed at its initial 128 KiB, and left dynamic (the default). Each side runs ``--mem-reps``
    fresh processes (sides alternating); its peak is the median of theirs (one run varies by
    about 1 MiB)."""
    out: dict[str, dict] = {"fixed": {}, "default": {}}
    for allocator, extra in (("fixed", FIXED_MMAP_THRESHOLD), ("default", {})):
        runs: dict[str, list[dict]] = {"lora-tune": [], "peft": []}
        for rep in range(args.mem_reps):
            for side in (("lora-tune", "peft") if rep % 2 == 0 else ("peft", "lora-tune")):
                runs[side].append(memory_run(side, args, extra))
        for side, results in runs.items():
            peaks = sorted(r["peak_rss_growth_bytes"] for r in results)
            got = out[allocator][side] = dict(results[0], peak_rss_growth_bytes=statistics.median(peaks))
            print(f"  4-bit {side:9s} ({allocator} mmap threshold) weights {got['weight_bytes'] / 2**20:.2f} MiB, "
                  f"peak RSS growth median {got['peak_rss_growth_bytes'] / 2**20:.1f} MiB of "
                  + ", ".join(f"{p / 2**20:.1f}" for p in peaks), file=sys.stderr, flush=True)
        if out[allocator]["lora-tune"]["trainable"] != out[allocator]["peft"]["trainable"]:
            raise SystemExit(f"4-bit configs differ: {out[allocator]['lora-tune']['trainable']:,} vs "
                             f"{out[allocator]['peft']['trainable']:,} trainable parameters")
    return out


def memory_run(side: str, args, extra: dict) -> dict:
    """One fresh memory-child process for ``side``; its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", side, "--threads",
           str(args.threads), "--batch", str(args.batch), "--max-length", str(args.max_length),
           "--rank", str(args.rank), "--mem-steps", str(args.mem_steps)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | extra
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        raise SystemExit(f"memory child {side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- report ---------------------------------------------------------------------------------

def table_rows(speed: list[Throughput], mem: dict[str, dict] | None) -> list[dict]:
    rows = []
    for t in speed:
        label = "fp32" if t.precision == "fp32" else "bf16 autocast"
        ours, ref = t.tokens_per_second["lora-tune"], t.tokens_per_second["trl"]
        rows.append({"measurement": f"SFT train step, {label}: non-padding tokens/s", "lora_tune": ours,
                     "reference": ref, "unit": "tokens/s", "ratio": ours / ref, "goal": ">= 1.00",
                     "met": ours / ref >= 1.0})
        ours, ref = t.ms_per_step["lora-tune"], t.ms_per_step["trl"]
        rows.append({"measurement": f"(context) SFT train step, {label}: time per step", "lora_tune": ours,
                     "reference": ref, "unit": "ms", "ratio": ours / ref, "goal": "-", "met": None})
    if mem:
        def row(label: str, key: str, allocator: str, unit: str, goal: str) -> dict:
            ours, ref = mem[allocator]["lora-tune"][key], mem[allocator]["peft"][key]
            scale = 2**20 if unit == "MiB" else 1
            return {"measurement": label, "lora_tune": ours / scale, "reference": ref / scale, "unit": unit,
                    "ratio": ours / ref, "goal": goal, "met": None if goal == "-" else ours <= ref}

        rows += [
            row("4-bit nf4 base: peak RSS growth of the training steps (glibc mmap threshold fixed)",
                "peak_rss_growth_bytes", "fixed", "MiB", "<= 1.00"),
            row("(context) 4-bit nf4 base: peak RSS growth, glibc default (dynamic mmap threshold)",
                "peak_rss_growth_bytes", "default", "MiB", "-"),
            row("(context) 4-bit nf4 base: tensors saved for backward by one forward",
                "saved_for_backward_bytes", "fixed", "MiB", "-"),
            row("(context) 4-bit nf4 base: model weights (params + buffers + quant state)",
                "weight_bytes", "fixed", "MiB", "-"),
            row("(context) 4-bit nf4 base, fp32, same loop (fit): non-padding tokens/s",
                "tokens_per_second", "default", "tokens/s", "-"),
        ]
    return rows


def _number(value: float, unit: str) -> str:
    if unit == "tokens/s":
        return f"{value:,.0f} {unit}"
    return f"{value:,.1f} {unit}" if unit == "ms" else f"{value:,.2f} {unit}"


def print_table(rows: list[dict], settings: dict, speed: list[Throughput]) -> None:
    s = settings
    print(f"Tiny Llama (hidden 256, 4 layers, 4 heads, intermediate 688, vocab {s['vocab']}), sft task on "
          f"studies/data/sft/train.jsonl (chat template, assistant-only loss, max_length {s['max_length']}, "
          f"no packing), batch {s['batch']}, LoRA r={s['rank']} alpha={2 * s['rank']} dropout 0 on "
          f"{','.join(TARGETS)} ({s['trainable']:,} trainable), AdamW lr {LEARNING_RATE}, {s['device']}, "
          f"torch {s['torch']}, "
          f"transformers {s['transformers']}, trl {s['trl']}, peft {s['peft']}, bitsandbytes {s['bitsandbytes']}, "
          f"{s['threads']} thread(s), {s['clock']} time; median of {s['reps']} repetitions (sides alternating) of "
          f"{s['steps']} timed steps after {s['warmup']} warm-up steps; 4-bit: one fresh process per side and "
          f"allocator setting, peak over {s['mem_steps'] + 1} fit() steps after a warm-up forward/backward, "
          f"median of {s['mem_reps']} processes per side\n")
    print("| measurement | lora-tune | TRL + PEFT (4-bit: PEFT + bitsandbytes) | ratio | goal | met |")
    print("|---|---:|---:|---:|---:|:---:|")
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "no")
        print(f"| {r['measurement']} | {_number(r['lora_tune'], r['unit'])} | {_number(r['reference'], r['unit'])} | "
              f"{r['ratio']:.3f}x | {r['goal']} | {met} |")
    for t in speed:
        spread = "; ".join(f"{side}: " + ", ".join(f"{v:,.0f}" for v in t.runs[side]) for side in SIDES)
        print(f"\n{t.precision} tokens/s per repetition: {spread}; {t.tokens_per_step:.0f} non-padding of "
              f"{t.padded_tokens_per_step:.0f} positions per step", end="")
    print()


def settings_of(args, task) -> dict:
    import bitsandbytes
    import peft
    import transformers
    import trl

    model = task.build_model()
    inject(model, lora_tune_config(args.rank))
    return {"vocab": len(task.tokenizer), "max_length": args.max_length, "batch": args.batch, "rank": args.rank,
            "threads": args.threads, "clock": args.clock, "reps": args.reps, "steps": args.steps,
            "warmup": args.warmup, "mem_steps": args.mem_steps, "mem_reps": args.mem_reps,
            "trainable": trainable(model), "device": DEVICE,
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "quick": args.quick}


def quiet() -> None:
    warnings.simplefilter("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.disable_progress_bars()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps at the start of each run")
    ap.add_argument("--mem-steps", type=int, default=5, help="training steps of each 4-bit memory process")
    ap.add_argument("--mem-reps", type=int, default=5, help="4-bit memory processes per side (median)")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--no-memory", action="store_true", help="skip the 4-bit memory rows")
    ap.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                    help="auto: process CPU time with 1 thread, wall time with more")
    ap.add_argument("--device", default="cpu",
                    help="cpu (default) or cuda[:N]: both sides train there; on CUDA the clock is wall time after "
                         "torch.cuda.synchronize() and the 4-bit memory rows (host RSS) are left out")
    ap.add_argument("--quick", action="store_true", help="1 repetition of 4 steps after 1 warm-up: a smoke run")
    ap.add_argument("--json", metavar="PATH", help="also write the rows and settings as JSON")
    ap.add_argument("--memory-child", choices=["lora-tune", "peft"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    global CLOCK, DEVICE
    DEVICE = args.device
    if DEVICE != "cpu":  # GPU work is asynchronous and not CPU time: wall time after a synchronize
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {DEVICE}: CUDA is not available")
        args.clock, args.no_memory = "wall", True

        def synced_clock() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

        CLOCK = synced_clock
    else:
        if args.clock == "auto":
            args.clock = "cpu" if args.threads == 1 else "wall"
        CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.quick:
        args.reps, args.steps, args.warmup, args.mem_steps, args.mem_reps = 1, 4, 1, 3, 1
    torch.set_num_threads(args.threads)
    quiet()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args)))
        return

    task = build_sft_task(args.max_length)
    settings = settings_of(args, task)
    speed = [throughput(task, p, args) for p in args.precisions.split(",")]
    mem = None if args.no_memory else memory(args)
    rows = table_rows(speed, mem)
    print_table(rows, settings, speed)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows,
                                               "throughput": [asdict(t) for t in speed], "memory": mem}, indent=2))


if __name__ == "__main__":
    main()
