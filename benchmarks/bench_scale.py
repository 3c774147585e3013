"""Real-size QLoRA studies (issue 18): per-trial setup, wall time and process-tree memory of
lora-tune's ``sft`` studies against the hand-written transformers + PEFT route, on a
TinyLlama-1.1B-shaped Llama built by the benchmark.

    python benchmarks/bench_scale.py                   # the measurement (CPU, one thread: roughly 15-30 minutes)
    python benchmarks/bench_scale.py --quick           # a small Llama (hidden 256, 2 layers): a smoke run
    python benchmarks/bench_scale.py --device cuda     # bf16 base -> 4-bit on the GPU (benchmarks/gpu_check.sh)
    python benchmarks/bench_scale.py --json out.json   # also writes every number (samples included)
    python benchmarks/bench_scale.py --oom-check --device cuda   # the CUDA out-of-memory -> FAIL path

**Model.** A Llama with TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers, 32
heads, 4 KV heads, vocabulary 32,000, 2,048 positions, untied head; 1,100,048,384 parameters),
seeded random weights (transformers' initialisation, built in bfloat16 directly), saved with
``save_pretrained`` as one bf16 safetensors file (2.05 GiB), with a byte-level BPE tokenizer
trained on the instruction data by the ``tokenizers`` library and a ChatML-like chat template
(``lora_tune.models.tiny_lm.build_chat_tokenizer``; the model's vocabulary stays 32,000). Built
once, in a subprocess, and cached under ``--work`` (default ``$TMPDIR/lora-tune-bench``, else
``~/.cache/lora-tune-bench``); ``--quick``: hidden 256, intermediate 768, 2 layers, 4 heads, 2 KV
heads, same vocabulary. The model files are read once before the sides, so every side reads them
from the page cache.

**Data.** studies/data/sft/train.jsonl (messages, rendered by the chat template) and eval.jsonl.

**Three sides**, one after the other in one run (``--order``), each ``--trials`` trials (default 4)
of 2 optimizer steps at batch 1 and ``max_length`` 64, LoRA rank 16 (alpha 32, dropout 0) on all
linear layers of the blocks, the base in 4 bits (nf4, double quantization), AdamW lr 2e-4,
gradient clipping 1.0, one evaluation of ``--eval-examples`` (default 2) held-out examples at the
end, the trial's adapter saved; ``--device`` (default CPU) and one thread (``train.threads: 1``
and ``OMP_NUM_THREADS=1`` / ``MKL_NUM_THREADS=1`` for every child):

1. **lora-tune, isolation: process**: ``lora-tune run study.yaml`` (a subprocess; SQLite storage
   in the run's folder) of a search space that fixes every value (rank 16, alpha 32, targets
   all-linear, quant_bits 4, nf4, double_quant), random sampler, no pruner, no baseline, the
   ``sft`` task with ``model:`` the built directory, ``dtype: bfloat16``, ``precision: auto``
   (fp32 compute on a CPU, bf16 autocast on CUDA); every trial the same seed.
2. **lora-tune, isolation: none**: the same study, trials in the driver process.
3. **by hand**, per trial a fresh ``python`` subprocess (this file, ``--hand-child``; it imports
   no lora-tune): transformers' ``AutoModelForCausalLM.from_pretrained(dir,
   quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16), dtype=torch.bfloat16,
   device_map={"": device})`` (compute dtype **bfloat16**, as the checkpoint's own dtype), then
   ``peft.get_peft_model`` (``target_modules="all-linear"``, r 16, alpha 32), the same 2 steps with
   ``torch.optim.AdamW`` on examples of the same data rendered by the same tokenizer and chat
   template (at most ``max_length`` tokens, a seeded random order; every token supervised), the
   same evaluation count (the first eval examples), and ``save_pretrained`` of the adapter.

Each lora-tune side gets its own empty ``$LORA_TUNE_CACHE`` (so its first trial builds the base from
the checkpoint and no side reads another's disk cache of quantized bases); its size afterwards is
reported (the quantized base as stored) and the folder removed (``--keep-cache`` keeps it).

**Per trial:** setup seconds (lora-tune: the trial's ``setup_seconds`` user attribute, trial start
-> first optimizer step, on the driver's clock; by hand: the child's own clock from just before
the parent started the process to the first optimizer step's beginning, so interpreter start and
imports are in it as they are in a fresh lora-tune trial process); wall seconds (lora-tune:
``datetime_complete - datetime_start``; by hand: the subprocess's wall time); ``base_load``
(``built`` / ``resident`` / ``cache``); the peak memory of the process tree: a thread of this
process samples ``/proc/<pid>/smaps_rollup`` of the side's subprocess and every descendant
(``lora-tune run`` -> its forkserver -> the trial process; the hand child) every 0.1 s and sums
their PSS (and RSS, for context; RSS counts shared pages once per process). A sample belongs to the
trial whose [start, complete] holds it; the side's peak is over all its samples (the driver's task
build before trial 0 included). This benchmark process imports no torch and is not counted (it is
the same for every side). Peaks between two samples can be missed.

**Summary and goals** (issue 18), for each lora-tune side: later trials' (trial >= 2) median
setup <= 2 s; later trials' median wall <= 0.25x the hand route's median per-trial wall; the
side's tree peak PSS <= 0.6x the hand route's; the first trial no slower than today. "Today" is
quoted from the issue, not re-measured: setup 62-81 s every trial (by hand 53-62 s), tree peak
9.06 GB RSS sum / 6.56 GB PSS (by hand 3.5-4.1 GB), same model and settings, one CPU thread.

**On paper** (8B and 70B Llama bases, Llama-3 shapes: vocabulary 128,256, untied head; 8B: hidden
4096, intermediate 14336, 32 layers, 8 KV heads of 128; 70B: hidden 8192, intermediate 28672, 80
layers, 8 KV heads of 128), from this run's measured per-parameter costs:

* resident base = quantized parameters (the blocks' linear weights) x the measured bytes per
  quantized parameter + the other parameters x 2 bytes (bf16). Bytes per quantized parameter:
  (the disk-cache entry of the quantized base written by the lora-tune side, minus its bf16
  weights) / quantized parameters; without an entry, the hand route's
  ``get_memory_footprint()`` instead.
* adapters + AdamW: rank-16 LoRA parameters on every linear of the blocks x 16 bytes (fp32
  weight, gradient, two moments).
* activations: 64 tokens x layers x (10 x hidden + 4 x intermediate) x 4 bytes (an estimate of
  what a layer keeps for the backward, fp32).
* the rest (the Python process, libraries, data, allocator slack) is taken as measured: the
  side's later-trial tree peak PSS minus the three parts above at 1.1B, assumed not to grow.
* first-trial setup = later-trial setup + s x parameters, s = (first setup - later median setup)
  / the measured model's parameters: everything a first trial does beyond a later one (reading,
  quantizing and placing the base, building the task, in process isolation starting the trial
  process) is taken to scale with the parameters, so this is an upper bound for big bases.
* later-trial setup: from the measured median (nothing scales) to that median x the ratio of
  LoRA parameters (everything scales with the adapters).
Numbers measured on a CPU give CPU estimates (host RAM, one thread); with ``--device cuda`` the
base, adapters and activations are GPU memory and the rates are the GPU's.

**Not here:** the vocabulary row of issue 18 (a tiny Llama with Qwen2's 151,936-token vocabulary,
1,024 tokens x batch 4, peak memory of a step before and after the chunked loss) is
``benchmarks/bench_vocab.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "studies" / "data" / "sft"
TRAIN_FILE, EVAL_FILE = DATA / "train.jsonl", DATA / "eval.jsonl"
MIB, GIB = 2**20, 2**30

FULL = {"model_type": "llama", "vocab_size": 32_000, "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10_000.0, "tie_word_embeddings": False}
# intermediate 768, not 688: bitsandbytes' CPU inference repacking needs output sizes divisible by 32
QUICK = dict(FULL, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
MODEL_SEED = 0
TOKENIZER_VOCAB = 2000  # the BPE trainer's cap; the instruction data gives fewer merges
MARKER = "bench_scale_model.json"

RANK, ALPHA, LEARNING_RATE, GRAD_CLIP = 16, 32, 2e-4, 1.0
SIDES = ("process", "none", "hand")
SIDE_LABEL = {"process": "lora-tune, isolation: process", "none": "lora-tune, isolation: none",
              "hand": "by hand: transformers 4-bit + PEFT, fresh process"}
# issue 18's measurements of lora-tune before the work (quoted, not re-measured)
TODAY = {"setup": "62-81 s every trial", "setup_max_s": 81.0, "hand_setup": "53-62 s",
         "peak": "9.06 GB RSS sum (6.56 GB PSS)", "hand_peak": "3.5-4.1 GB"}
GOALS = {"later_setup_s": 2.0, "wall_ratio": 0.25, "peak_ratio": 0.6}
# Llama-3 shapes for the table on paper
PAPER = {
    "8B": {"vocab_size": 128_256, "hidden_size": 4096, "intermediate_size": 14_336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False},
    "70B": {"vocab_size": 128_256, "hidden_size": 8192, "intermediate_size": 28_672, "num_hidden_layers": 80,
            "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False},
}
PAPER_TOKENS = 64


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the model (built in a subprocess: this process imports no torch) -----------------------

def model_config(quick: bool) -> dict:
    return dict(QUICK if quick else FULL)


def build_model(path: Path, quick: bool) -> None:
    """Runs in a fresh process: the tokenizer and the seeded bf16 Llama, saved to ``path``."""
    import inspect

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_tune.models.tiny_lm import build_chat_tokenizer, special_token_ids

    path.mkdir(parents=True, exist_ok=True)
    texts = [m["content"] for file in (TRAIN_FILE, EVAL_FILE) for row in _jsonl(file) for m in row["messages"]]
    tokenizer = build_chat_tokenizer(texts, path, vocab_size=TOKENIZER_VOCAB)
    keys = dict(model_config(quick), **special_token_ids(tokenizer))
    config = AutoConfig.for_model(keys.pop("model_type"), **keys)
    torch.manual_seed(MODEL_SEED)
    torch.set_default_dtype(torch.bfloat16)  # initialised in bf16: no float32 copy of 1.1B parameters
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    takes = inspect.signature(model.save_pretrained).parameters
    extra = {"safe_serialization": True} if "safe_serialization" in takes else {}  # transformers 5: always
    model.save_pretrained(str(path), max_shard_size="100GB", **extra)  # one safetensors file
    (path / MARKER).write_text(json.dumps({"config": model_config(quick), "seed": MODEL_SEED, "params": params,
                                           "tokenizer_vocab": len(tokenizer)}))


def ensure_model(work: Path, quick: bool) -> Path:
    path = work / ("llama-quick" if quick else "tinyllama-1.1b-shape")
    marker = path / MARKER
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(marker.read_text())
        if info["config"] == model_config(quick) and info["seed"] == MODEL_SEED and list(path.glob("*.safetensors")):
            return path
    if path.exists():
        shutil.rmtree(path)
    log(f"building the model in {path} (once) ...")
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build-model", str(path)]
                         + (["--quick"] if quick else []), cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"building the model failed:\n{run.stderr[-4000:]}")
    log(f"  built in {time.perf_counter() - t0:.0f} s")
    return path


def safetensors_counts(path: Path) -> dict:
    """Parameters of the checkpoint from its safetensors headers (no torch): all, the blocks'
    linear weights (what 4-bit quantizes), the rest, and bytes on disk."""
    total = quantized = size = 0
    for file in sorted(path.glob("*.safetensors")):
        size += file.stat().st_size
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = math.prod(info["shape"])
            total += numel
            if ".layers." in name and name.endswith("_proj.weight"):
                quantized += numel
    return {"params": total, "quantized_params": quantized, "dense_params": total - quantized, "file_bytes": size}


def warm_page_cache(path: Path) -> None:
    for file in sorted(path.iterdir()):
        if file.is_file():
            with open(file, "rb") as fh:
                while fh.read(64 * MIB):
                    pass


# -- the process tree's memory ----------------------------------------------------------------

def _ppids() -> dict[int, int]:
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
            out[int(entry.name)] = int(stat[stat.rindex(b")") + 2:].split()[1])
    return out


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    return pids


def rollup(pid: int) -> tuple[int, int] | None:
    """(PSS, RSS) bytes of a process from /proc/<pid>/smaps_rollup; None once it is gone."""
    pss = rss = None
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        return None
    return None if pss is None or rss is None else (pss, rss)


class TreeSampler:
    """Samples (time, PSS sum, RSS sum, processes) of a process and its descendants every
    ``interval`` seconds in a thread, from :meth:`start` to :meth:`stop`."""

    def __init__(self, root: int, interval: float = 0.1):
        self.root, self.interval = root, interval
        self.samples: list[tuple[float, int, int, int]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._done.is_set():
            t = time.time()
            pss = rss = n = 0
            for pid in tree_pids(self.root):
                got = rollup(pid)
                if got:
                    pss, rss, n = pss + got[0], rss + got[1], n + 1
            if n:
                self.samples.append((t, pss, rss, n))
            self._done.wait(max(0.0, self.interval - (time.time() - t)))

    def stop(self) -> list[tuple[float, int, int, int]]:
        self._done.set()
        self._thread.join()
        return self.samples


def peak_between(samples: list, start: float, end: float) -> tuple[int | None, int | None]:
    inside = [s for s in samples if start <= s[0] <= end]
    if not inside:
        return None, None
    return max(s[1] for s in inside), max(s[2] for s in inside)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"})
    env.update(extra)
    return env


def run_sampled(cmd: list[str], logfile: Path, env: dict[str, str], timeout: float) -> dict:
    """Run ``cmd`` with its process tree sampled; its exit code, start/end and samples."""
    with open(logfile, "wb") as out:
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid).start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            log(f"  {cmd[1:3]} timed out after {timeout:.0f} s")
        end = time.time()
        samples = sampler.stop()
    return {"rc": rc, "start": start, "end": end, "samples": samples}


def log_tail(path: Path, n: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


# -- the lora-tune sides ----------------------------------------------------------------------

def study_spec(side: str, args, model_dir: Path, run_dir: Path) -> dict:
    return {
        "study": {"name": f"bench-scale-{side}", "storage": f"sqlite:///{run_dir / side / 'study.db'}",
                  "direction": "minimize", "metric": "eval_loss", "sampler": {"type": "random", "seed": 0},
                  "pruner": {"type": "none"}, "n_trials": args.trials, "baseline": False,
                  "failed_trial_retries": 0, "max_consecutive_failures": args.trials},
        "task": {"type": "sft", "model": str(model_dir), "train_file": str(TRAIN_FILE), "eval_file": str(EVAL_FILE),
                 "format": "messages", "max_length": args.max_length, "train_on": "completion",
                 "dtype": "bfloat16", "max_eval_examples": args.eval_examples, "seed": 0},
        "search_space": {"rank": RANK, "alpha": ALPHA, "targets": "all-linear", "quant_bits": 4,
                         "quant_type": "nf4", "double_quant": True},
        "train": {"epochs": 1, "max_steps": args.steps, "batch_size": 1, "evals_per_epoch": 1,
                  "learning_rate": LEARNING_RATE, "grad_clip": GRAD_CLIP, "optimizer": "adamw",
                  "lr_scheduler": "constant", "precision": "auto", "device": args.device, "threads": 1,
                  "isolation": side, "seed": 0},
    }


def lora_tune_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("lora-tune")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lora_tune.cli.main"]


def run_lora_tune_side(side: str, args, model_dir: Path, run_dir: Path) -> dict:
    import yaml

    folder = run_dir / side
    folder.mkdir(parents=True)
    spec = study_spec(side, args, model_dir, run_dir)
    study_file = folder / "study.yaml"
    study_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    cache = folder / "cache"
    logfile = folder / "run.log"
    log(f"{SIDE_LABEL[side]}: lora-tune run {study_file} ...")
    got = run_sampled(lora_tune_cmd() + ["run", str(study_file)], logfile,
                      child_env(LORA_TUNE_CACHE=str(cache)), args.side_timeout)
    out = {"side": side, "rc": got["rc"], "run_seconds": got["end"] - got["start"], "log": str(logfile),
           "study_file": str(study_file), "samples": got["samples"], "trials": []}
    out["peak_pss"] = max((s[1] for s in got["samples"]), default=None)
    out["peak_rss"] = max((s[2] for s in got["samples"]), default=None)
    out["cache_bytes"] = _cache_weights_bytes(cache)
    if not args.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    if got["rc"]:
        out["error"] = f"lora-tune run exited {got['rc']}"
        log(f"  {out['error']}; the end of {logfile}:\n{log_tail(logfile)}")
    out["trials"] = read_trials(spec["study"]["storage"], spec["study"]["name"], got["samples"])
    if out["trials"]:
        first = out["trials"][0]["start"]
        out["before_first_trial_seconds"] = first - got["start"]
        out["before_first_trial_peak_pss"] = peak_between(got["samples"], got["start"], first)[0]
    for t in out["trials"]:
        log(f"  trial {t['trial']}: {t['state']}, base_load {t['base_load']}, setup {_s(t['setup'])}, "
            f"wall {_s(t['wall'])}, tree peak PSS {_mib(t['peak_pss'])}" + (f" ({t['fail_reason']})" if t.get(
                "fail_reason") else ""))
    return out


def _cache_weights_bytes(cache: Path) -> int | None:
    files = list(cache.glob("bases/*/weights.safetensors")) if cache.is_dir() else []
    return max((f.stat().st_size for f in files), default=None)


def read_trials(storage: str, name: str, samples: list) -> list[dict]:
    import optuna

    from lora_tune.study.trial import record

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except Exception as exc:  # noqa: BLE001 - no study: the run failed before creating it
        log(f"  no study {name!r} in {storage}: {exc}")
        return []
    rows = []
    for i, trial in enumerate(sorted(study.trials, key=lambda t: t.number), start=1):
        attrs = trial.user_attrs
        start = trial.datetime_start.timestamp() if trial.datetime_start else None
        end = trial.datetime_complete.timestamp() if trial.datetime_complete else None
        pss, rss = peak_between(samples, start, end) if start and end else (None, None)
        rows.append({"trial": i, "number": trial.number, "state": trial.state.name,
                     "base_load": attrs.get(record.BASE_LOAD), "setup": attrs.get(record.SETUP_SECONDS),
                     "wall": end - start if start and end else None, "start": start, "end": end,
                     "peak_pss": pss, "peak_rss": rss, "device_peak": attrs.get(record.PEAK_MEMORY_TOTAL_BYTES),
                     "train_seconds": attrs.get(record.TRAIN_SECONDS), "value": trial.value if trial.values else None,
                     "fail_reason": attrs.get(record.FAIL_REASON)})
    return rows


# -- the hand-written route --------------------------------------------------------------------

def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def hand_child(args) -> dict:
    """Runs in a fresh process (no lora-tune import): one trial by hand; see the module docstring."""
    t0 = args.t0
    import torch

    torch.set_num_threads(args.threads)
    import bitsandbytes
    import peft
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model_dir, device = args.model_dir, torch.device(args.device)
    cuda = device.type == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    def encode(rows: list[dict]) -> list[list[int]]:
        out = []
        for row in rows:
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= args.max_length:
                out.append(ids)
        return out

    train, held_out = encode(_jsonl(TRAIN_FILE)), encode(_jsonl(EVAL_FILE))[:args.eval_examples]
    order = random.Random(args.seed).sample(range(len(train)), args.steps)

    def batch(ids: list[int]) -> dict:
        x = torch.tensor([ids], device=device)
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x, "use_cache": False}

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    place = f"cuda:{torch.cuda.current_device()}" if cuda and device.index is None else str(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": place}, local_files_only=True)
    model.config.use_cache = False
    base_bytes = model.get_memory_footprint()
    loaded = time.time() - t0
    torch.manual_seed(args.seed)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                       target_modules="all-linear", bias="none",
                                                       task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    batches = [batch(train[i]) for i in order]
    model.train()
    if cuda:
        torch.cuda.synchronize(device)
    setup = time.time() - t0  # the first optimizer step begins
    losses = []
    for b in batches:
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for ids in held_out:
            n = len(ids) - 1
            total += float(model(**batch(ids)).loss) * n
            count += n
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
    if cuda:
        torch.cuda.synchronize(device)
    return {"setup": setup, "loaded": loaded, "inside_wall": time.time() - t0, "train_losses": losses,
            "eval_loss": total / max(count, 1), "trainable": sum(p.numel() for p in params),
            "base_bytes": base_bytes,
            "device_peak": torch.cuda.max_memory_allocated(device) if cuda else None,
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}}


def run_hand_side(args, model_dir: Path, run_dir: Path) -> dict:
    folder = run_dir / "hand"
    folder.mkdir(parents=True)
    out: dict[str, Any] = {"side": "hand", "trials": [], "samples": [], "rc": 0}
    log(f"{SIDE_LABEL['hand']}: {args.trials} fresh processes ...")
    for i in range(1, args.trials + 1):
        logfile = folder / f"trial-{i}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--hand-child", "--model-dir", str(model_dir),
               "--device", args.device, "--seed", str(i - 1), "--steps", str(args.steps), "--max-length",
               str(args.max_length), "--eval-examples", str(args.eval_examples), "--t0", repr(time.time())]
        got = run_sampled(cmd, logfile, child_env(), args.side_timeout)
        out["samples"] += got["samples"]
        row: dict[str, Any] = {"trial": i, "state": "COMPLETE", "base_load": "built (transformers)",
                               "wall": got["end"] - got["start"], "start": got["start"], "end": got["end"],
                               "peak_pss": max((s[1] for s in got["samples"]), default=None),
                               "peak_rss": max((s[2] for s in got["samples"]), default=None)}
        try:
            if got["rc"]:
                raise ValueError(f"exit code {got['rc']}")
            result = json.loads(log_tail(logfile, 100_000).strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            row.update(state="FAIL", setup=None, fail_reason=str(exc))
            out["rc"] = got["rc"] or 1
            out["error"] = f"hand trial {i} failed ({exc}); see {logfile}"
            log(f"  {out['error']}:\n{log_tail(logfile)}")
        else:
            row.update(setup=result.pop("setup"), device_peak=result.pop("device_peak"), value=result["eval_loss"],
                       details=result)
            out.setdefault("base_bytes", result["base_bytes"])
            out.setdefault("versions", result["versions"])
            out.setdefault("device_name", result["device_name"])
        out["trials"].append(row)
        log(f"  trial {i}: setup {_s(row.get('setup'))}, wall {_s(row['wall'])}, "
            f"tree peak PSS {_mib(row['peak_pss'])}")
    out["peak_pss"] = max((s[1] for s in out["samples"]), default=None)
    out["peak_rss"] = max((s[2] for s in out["samples"]), default=None)
    out["run_seconds"] = sum(t["wall"] for t in out["trials"])
    return out


# -- summary --------------------------------------------------------------------------------

def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(side: dict, hand: dict | None) -> dict:
    done = [t for t in side["trials"] if t["state"] == "COMPLETE"]
    first = side["trials"][0] if side["trials"] else None
    later = [t for t in done if t["trial"] >= 2]
    hand_wall = _median([t["wall"] for t in hand["trials"] if t["state"] == "COMPLETE"]) if hand else None
    s = {"trials": len(side["trials"]), "complete": len(done),
         "first_setup": first["setup"] if first and first["state"] == "COMPLETE" else None,
         "first_wall": first["wall"] if first and first["state"] == "COMPLETE" else None,
         "later_setup": _median([t["setup"] for t in later]), "later_wall": _median([t["wall"] for t in later]),
         "later_peak_pss": max((t["peak_pss"] for t in later if t["peak_pss"]), default=None),
         "peak_pss": side.get("peak_pss"), "peak_rss": side.get("peak_rss"),
         "base_loads": [t["base_load"] for t in side["trials"]],
         "median_wall": _median([t["wall"] for t in done])}
    ours = side["side"] != "hand"
    s["wall_ratio"] = s["later_wall"] / hand_wall if ours and s["later_wall"] and hand_wall else None
    s["peak_ratio"] = (s["peak_pss"] / hand["peak_pss"] if ours and hand and s["peak_pss"] and hand.get("peak_pss")
                       else None)
    return s


def _s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f} s" if v < 10 else f"{v:,.1f} s"


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v / MIB:,.0f} MiB"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}x"


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "no")


def tables(result: dict) -> str:
    a = result["settings"]
    m = result["machine"]
    sides = result["sides"]
    cuda = a["device"] != "cpu"
    lines = [
        f"{'Small Llama (--quick: a smoke run, not a measurement)' if a['quick'] else 'TinyLlama-1.1B-shaped Llama'}"
        f" ({result['model']['params']:,} parameters, {result['model']['quantized_params']:,} of them in the blocks' "
        f"linear layers; bf16 safetensors {result['model']['file_bytes'] / GIB:.2f} GiB), sft on "
        f"studies/data/sft, {a['trials']} trials x {a['steps']} steps at batch 1 x <= {a['max_length']} tokens, "
        f"LoRA r{RANK} alpha {ALPHA} all-linear, 4-bit nf4 + double quant, eval of {a['eval_examples']} examples; "
        f"device {a['device']}" + (f" ({m.get('device_name')})" if cuda else "") + ", 1 thread.",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs ({m['affinity']} usable), {m['memory_gib']:.0f} GiB; "
        f"load average (1/5/15 min) at start {m['load_start']}, at end {m['load_end']}; "
        + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items()) + ".",
        "",
        "| side | trial | state | base_load | setup | wall | tree peak PSS | tree peak RSS sum |"
        + (" device peak |" if cuda else ""),
        "|---|---:|---|---|---:|---:|---:|---:|" + ("---:|" if cuda else ""),
    ]
    for name, side in sides.items():
        for t in side["trials"]:
            reason = f" ({t['fail_reason'][:80]})" if t.get("fail_reason") else ""
            lines.append(f"| {SIDE_LABEL[name]} | {t['trial']} | {t['state']}{reason} | {t['base_load'] or '-'} | "
                         f"{_s(t['setup'])} | {_s(t['wall'])} | {_mib(t['peak_pss'])} | {_mib(t['peak_rss'])} |"
                         + (f" {_mib(t.get('device_peak'))} |" if cuda else ""))
        if side.get("error") and not side["trials"]:
            lines.append(f"| {SIDE_LABEL[name]} | - | {side['error']} | | | | | |" + (" |" if cuda else ""))
    lines += ["", "| side | first trial setup | later trials' setup (median) | later trials' wall (median) "
              "| later wall / hand's median wall | tree peak PSS (whole run) | peak / hand's peak "
              "| before trial 1 (driver) | run wall |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, side in sides.items():
        s = result["summary"][name]
        before = (f"{_s(side.get('before_first_trial_seconds'))}, peak {_mib(side.get('before_first_trial_peak_pss'))}"
                  if "before_first_trial_seconds" in side else "-")
        wall_ratio, peak_ratio = _x(s["wall_ratio"]), _x(s["peak_ratio"])
        if name == "hand":
            wall_ratio = f"reference: median {_s(s['median_wall'])} per trial"
            peak_ratio = "reference"
        lines.append(f"| {SIDE_LABEL[name]} | {_s(s['first_setup'])} | {_s(s['later_setup'])} | "
                     f"{_s(s['later_wall'])} | {wall_ratio} | {_mib(s['peak_pss'])} | "
                     f"{peak_ratio} | {before} | {_s(side.get('run_seconds'))} |")
    goal_rows = [
        ("later trials' setup (median)", "later_setup", _s, f"<= {GOALS['later_setup_s']:.0f} s",
         lambda v: v <= GOALS["later_setup_s"]),
        ("later trials' wall / hand route's median per-trial wall", "wall_ratio", _x,
         f"<= {GOALS['wall_ratio']}x", lambda v: v <= GOALS["wall_ratio"]),
        ("tree peak PSS / hand route's peak", "peak_ratio", _x, f"<= {GOALS['peak_ratio']}x",
         lambda v: v <= GOALS["peak_ratio"]),
        ("first trial's setup", "first_setup", _s, f"no slower than today ({TODAY['setup']}, quoted)",
         None if cuda else (lambda v: v <= TODAY["setup_max_s"])),
    ]
    ours = [n for n in ("process", "none") if n in sides]
    if ours:
        lines += ["", "| goal (issue 18) | " + " | ".join(SIDE_LABEL[n] for n in ours) + " | goal | met |",
                  "|---|" + "---:|" * len(ours) + "---|---|"]
        for label, key, fmt, goal, ok in goal_rows:
            values = [result["summary"][n][key] for n in ours]
            judged = ok if not a["quick"] else None  # goals are for the 1.1B model
            met = " / ".join(_met(None if v is None or judged is None else judged(v)) for v in values)
            lines.append(f"| {label} | " + " | ".join(fmt(v) for v in values) + f" | {goal} | {met} |")
    lines += ["", f"Today (issue 18, quoted, not re-measured; CPU, one thread): lora-tune setup {TODAY['setup']}, "
              f"tree peak {TODAY['peak']}; by hand setup {TODAY['hand_setup']}, peak {TODAY['hand_peak']}."]
    if a["quick"]:
        lines.append("--quick: a small model; the goals are stated for the 1.1B model and are not judged by this run.")
    paper = result.get("paper")
    if paper:
        lines += ["", f"On paper (from {SIDE_LABEL[paper['side']]}'s measured costs at {paper['measured_params']:,} "
                  f"parameters: {paper['bytes_per_quantized_param']:.3f} bytes per quantized parameter "
                  f"({paper['bytes_source']}), first-trial setup {paper['seconds_per_gparam']:,.1f} s per billion "
                  f"parameters beyond a later trial, rest of the process tree {_mib(paper['runtime_bytes'])}; "
                  "assumptions in the module docstring):", "",
                  f"| base | parameters | resident 4-bit base | adapters + AdamW (r{RANK}) | activations "
                  f"({PAPER_TOKENS} tokens) | peak {'memory' if not cuda else 'GPU + host memory'} per trial (est.) "
                  "| first-trial setup (est.) | later-trial setup (est.) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in paper["rows"]:
            lines.append(f"| {row['name']} | {row['params'] / 1e9:,.2f} B | {row['base_bytes'] / GIB:,.2f} GiB | "
                         f"{row['adapter_bytes'] / GIB:,.2f} GiB | {row['activation_bytes'] / GIB:,.2f} GiB | "
                         f"{row['peak_bytes'] / GIB:,.1f} GiB | {row['first_setup']:,.0f} s | "
                         f"{_s(row['later_setup'][0])[:-2]}-{_s(row['later_setup'][1])} |")
    return "\n".join(lines)


# -- on paper -------------------------------------------------------------------------------

def llama_counts(c: dict) -> dict:
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down: (in, out)
    quantized = n * sum(a * b for a, b in linears)
    dense = v * h * (1 if c.get("tie_word_embeddings") else 2) + n * 2 * h + h
    lora = n * sum(RANK * (a + b) for a, b in linears)
    activations = PAPER_TOKENS * n * (10 * h + 4 * i) * 4
    return {"params": quantized + dense, "quantized": quantized, "dense": dense, "lora": lora,
            "activations": activations}


def on_paper(result: dict) -> dict | None:
    summary, sides = result["summary"], result["sides"]
    name = next((n for n in ("process", "none") if n in summary and summary[n]["first_setup"] is not None
                 and summary[n]["later_setup"] is not None and summary[n]["later_peak_pss"]), None)
    if name is None:
        return None
    s, model = summary[name], result["model"]
    here = llama_counts(model["config"])
    measured = model["params"]
    dense_bytes = 2 * model["dense_params"]
    cache = next((sides[n].get("cache_bytes") for n in (name, "process", "none") if n in sides
                  and sides[n].get("cache_bytes")), None)
    if cache:
        base, source = cache, "lora-tune's disk-cache entry of the quantized base"
    elif "hand" in sides and sides["hand"].get("base_bytes"):
        base, source = sides["hand"]["base_bytes"], "the hand route's transformers get_memory_footprint()"
    else:
        return None
    per_quantized = max(0.0, base - dense_bytes) / model["quantized_params"]
    runtime = s["later_peak_pss"] - base - 16 * here["lora"] - here["activations"]
    rate = max(0.0, s["first_setup"] - s["later_setup"]) / measured
    rows = []
    for label, config in [("measured (" + ("quick" if result["settings"]["quick"] else "1.1B") + ")",
                           model["config"])] + list(PAPER.items()):
        c = llama_counts(config)
        base_bytes = c["quantized"] * per_quantized + c["dense"] * 2
        rows.append({"name": label, "params": c["params"], "base_bytes": base_bytes, "adapter_bytes": 16 * c["lora"],
                     "activation_bytes": c["activations"],
                     "peak_bytes": base_bytes + 16 * c["lora"] + c["activations"] + runtime,
                     "first_setup": s["later_setup"] + rate * c["params"],
                     "later_setup": (s["later_setup"], s["later_setup"] * c["lora"] / here["lora"])})
    return {"side": name, "measured_params": measured, "bytes_per_quantized_param": per_quantized,
            "bytes_source": source, "seconds_per_gparam": rate * 1e9, "runtime_bytes": runtime, "rows": rows}


# -- the CUDA out-of-memory check ------------------------------------------------------------

def oom_check(args, model_dir: Path, work: Path) -> dict:
    """A study of three enqueued trials in ``isolation: process`` (batch 1, a batch that cannot
    fit, batch 1) on long packed-free text rows: the second must FAIL with an out-of-memory reason,
    its trial process must go, and the third must COMPLETE in a fresh one. Trial-process ids come
    from ``trial_process_pids()`` after each trial (the idle, reusable processes)."""
    import optuna
    import yaml

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not args.device.startswith("cuda"):
        log(f"--oom-check on {args.device}: no CUDA out-of-memory to provoke; this only exercises the check")
    from lora_tune.study.run.runner import create_study, optimize
    from lora_tune.study.schema.spec import parse_spec_text
    from lora_tune.study.trial import record
    from lora_tune.study.trial.trial_process import trial_process_pids

    folder = work / "oom-check" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True)
    os.environ["LORA_TUNE_CACHE"] = str(folder / "cache")  # its own disk cache of quantized bases
    words = [w for row in _jsonl(TRAIN_FILE) for m in row["messages"] for w in m["content"].split()]
    rng = random.Random(0)
    data = folder / "long.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=args.oom_words))}) + "\n"
                            for _ in range(max(args.oom_batch, 4))))
    spec_dict = {
        "study": {"name": "bench-scale-oom", "direction": "minimize", "metric": "eval_loss",
                  "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"}, "n_trials": 3,
                  "baseline": False, "failed_trial_retries": 0, "max_consecutive_failures": 3},
        "task": {"type": "sft", "model": str(model_dir), "train_file": str(data), "eval_file": str(data),
                 "format": "text", "max_length": min(2048, model_config(args.quick)["max_position_embeddings"]),
                 "dtype": "bfloat16", "max_eval_examples": 1, "seed": 0},
        "search_space": {"rank": RANK, "alpha": ALPHA, "targets": "all-linear", "quant_bits": 4,
                         "batch_size": {"choices": [1, args.oom_batch]}},
        "train": {"epochs": 1, "max_steps": 1, "evals_per_epoch": 1, "precision": "auto", "device": args.device,
                  "isolation": "process", "oom": "fail", "threads": 1, "seed": 0},
    }
    (folder / "study.yaml").write_text(yaml.safe_dump(spec_dict, sort_keys=False))
    spec = parse_spec_text(yaml.safe_dump(spec_dict), source=str(folder / "study.yaml"))
    study = create_study(spec, f"sqlite:///{folder / 'study.db'}")
    for batch in (1, args.oom_batch, 1):
        study.enqueue_trial({"batch_size": batch})
    pools: list[list[int]] = []
    optimize(study, spec, callbacks=[lambda _study, _trial: pools.append(trial_process_pids())])
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    rows = [{"number": t.number, "batch_size": t.params.get("batch_size"), "state": t.state.name,
             "fail_reason": t.user_attrs.get(record.FAIL_REASON), "setup": t.user_attrs.get(record.SETUP_SECONDS),
             "base_load": t.user_attrs.get(record.BASE_LOAD), "idle_trial_processes_after": pools[k] if k < len(pools)
             else None} for k, t in enumerate(trials)]
    states = [r["state"] for r in rows]
    oom_reason = len(rows) == 3 and "out of memory" in (rows[1]["fail_reason"] or "").lower()
    fresh = (len(pools) == 3 and len(pools[0]) == 1 and not pools[1] and len(pools[2]) == 1
             and pools[2][0] != pools[0][0])
    checks = {"states COMPLETE, FAIL, COMPLETE": states == ["COMPLETE", "FAIL", "COMPLETE"],
              "the FAIL reason says out of memory": oom_reason,
              "the OOM trial's process went, the next trial ran in a fresh one": fresh}
    return {"folder": str(folder), "trials": rows, "checks": checks, "ok": all(checks.values())}


def oom_table(got: dict) -> str:
    lines = ["| trial | batch size | state | base_load | setup | idle trial processes after it | reason |",
             "|---:|---:|---|---|---:|---|---|"]
    for r in got["trials"]:
        lines.append(f"| {r['number']} | {r['batch_size']} | {r['state']} | {r['base_load'] or '-'} | {_s(r['setup'])} "
                     f"| {r['idle_trial_processes_after']} | {(r['fail_reason'] or '')[:120]} |")
    lines += [""] + [f"- {name}: {'yes' if ok else 'NO'}" for name, ok in got["checks"].items()]
    lines.append(f"OOM -> FAIL check: {'PASS' if got['ok'] else 'FAIL'} (study in {got['folder']})")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------

def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) / 2**20
    return {"cpu": cpu, "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "memory_gib": memory,
            "threads_used": 1, "python": platform.python_version()}


def default_work() -> Path:
    tmp = os.environ.get("TMPDIR")
    if tmp:
        return Path(tmp) / "lora-tune-bench"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-tune-bench"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small Llama (hidden 256, 2 layers): a smoke run")
    ap.add_argument("--trials", type=int, default=4, help="trials per side (>= 2 for the later-trial rows)")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per trial (batch 1)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--eval-examples", type=int, default=2, help="held-out examples evaluated once per trial")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (train.device; the hand route's device_map)")
    ap.add_argument("--work", type=Path, default=None, help="model cache and runs (default: $TMPDIR/lora-tune-bench "
                    "or ~/.cache/lora-tune-bench)")
    ap.add_argument("--order", default="process,none,hand", help="which sides run, in this order")
    ap.add_argument("--side-timeout", type=float, default=3 * 3600.0, help="seconds per lora-tune run / hand trial")
    ap.add_argument("--keep-cache", action="store_true", help="keep the lora-tune sides' quantized-base caches")
    ap.add_argument("--json", metavar="PATH", help="also write everything (settings, trials, samples) as JSON")
    ap.add_argument("--oom-check", action="store_true", help="run the CUDA out-of-memory -> FAIL check instead")
    ap.add_argument("--oom-batch", type=int, default=256, help="the batch that cannot fit (--oom-check)")
    ap.add_argument("--oom-words", type=int, default=900, help="words per text row (--oom-check)")
    ap.add_argument("--build-model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--hand-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_model:
        build_model(args.build_model, args.quick)
        return
    if args.hand_child:
        print(json.dumps(hand_child(args)))
        return
    order = [s.strip() for s in args.order.split(",") if s.strip()]
    if not order or any(s not in SIDES for s in order) or len(set(order)) != len(order):
        ap.error(f"--order: a comma-separated subset of {', '.join(SIDES)}")
    if args.trials < 1 or args.steps < 1:
        ap.error("--trials and --steps must be at least 1")
    work = (args.work or default_work()).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_model(work, args.quick)
    if args.oom_check:
        got = oom_check(args, model_dir, work)
        print(oom_table(got))
        if args.json:
            Path(args.json).write_text(json.dumps(_jsonable(got), indent=2))
        sys.exit(0 if got["ok"] else 1)

    machine = machine_info()
    machine["load_start"] = "/".join(f"{v:.2f}" for v in os.getloadavg())
    counts = safetensors_counts(model_dir)
    warm_page_cache(model_dir)
    run_dir = work / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    log(f"run folder {run_dir}")
    sides: dict[str, dict] = {}
    for side in order:
        sides[side] = run_hand_side(args, model_dir, run_dir) if side == "hand" else \
            run_lora_tune_side(side, args, model_dir, run_dir)
    machine["load_end"] = "/".join(f"{v:.2f}" for v in os.getloadavg())
    hand = sides.get("hand")
    if hand:
        machine["versions"] = hand.get("versions")
        machine["device_name"] = hand.get("device_name")
    with contextlib.suppress(ImportError):
        import lora_tune

        machine.setdefault("versions", {})
        machine["versions"] = {"lora-tune": lora_tune.__version__, **(machine["versions"] or {})}
    ordered = {n: sides[n] for n in SIDES if n in sides}
    result = {"settings": {"quick": args.quick, "trials": args.trials, "steps": args.steps,
                           "max_length": args.max_length, "eval_examples": args.eval_examples,
                           "device": args.device, "order": order, "run_dir": str(run_dir),
                           "model_dir": str(model_dir), "when": dt.datetime.now().isoformat(timespec="seconds")},
              "machine": machine, "model": {"config": model_config(args.quick), **counts}, "sides": ordered,
              "summary": {n: summarize(s, hand) for n, s in ordered.items()}, "today_quoted": TODAY, "goals": GOALS}
    result["paper"] = on_paper(result)
    print(tables(result))
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(result), indent=1))
    if any(s.get("rc") for s in ordered.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
