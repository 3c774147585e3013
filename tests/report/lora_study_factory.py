"""Synthetic LoRA studies made with real Optuna (``create_trial`` + ``add_trial``).

The trials carry the params and user attributes of docs/architecture.md, intermediate
values, pruned and failed trials, a baseline and two workers, so every panel has data.
Imported by tests/report, tests/export and tests/browser.
"""
from __future__ import annotations

import math
import random
from datetime import datetime, timedelta

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

PRESETS = ["attention-qv", "attention", "all-linear"]
DISTRIBUTIONS = {
    "rank": IntDistribution(2, 64, log=True),
    "alpha_ratio": CategoricalDistribution([0.5, 1.0, 2.0, 4.0]),
    "targets": CategoricalDistribution(PRESETS),
    "quant_bits": CategoricalDistribution([0, 8, 4]),
    "learning_rate": FloatDistribution(1e-4, 3e-3, log=True),
    "dropout": FloatDistribution(0.0, 0.2),
}
MODULES = {"attention-qv": ["blocks.0.attn.q", "blocks.0.attn.v"],
           "attention": ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.o"],
           "all-linear": ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.o",
                          "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]}
SPEC = {"study": {"name": "synthetic", "direction": "maximize", "metric": "accuracy"},
        "task": {"type": "digits"},
        "train": {"epochs": 2, "batch_size": 32, "evals_per_epoch": 2, "seed": 0, "device": "cpu"}}
T0 = datetime(2026, 1, 1, 12, 0, 0)


def trial_record(number: int, params: dict, *, state: TrialState, value: float | None,
                 curve: list[float], planned: int, start: datetime, worker: str,
                 baseline: bool = False, multi: bool = False) -> optuna.trial.FrozenTrial:
    preset = params["targets"]
    rank = params["rank"]
    bits = params["quant_bits"]
    mods = MODULES[preset]
    trainable = rank * 2 * 64 * len(mods)
    steps = planned if state != TrialState.PRUNED else planned * len(curve) // 4
    evals = {planned * (i + 1) // 4: v for i, v in enumerate(curve)}
    secs = 0.01 * steps
    attrs = {
        "lora_config": {"rank": rank, "alpha": params["alpha_ratio"] * rank, "targets": preset,
                        "quant_bits": bits or None, "dropout": params["dropout"]},
        "target_preset": preset, "target_modules": mods, "trainable_params": trainable,
        "adapter_bytes": trainable * 4, "peak_memory_bytes": 10_000_000 + trainable * 16 // (1 + (bits or 32) // 8),
        "train_seconds": secs, "throughput": 32 * steps / secs if secs else 0.0,
        "train_steps": steps, "planned_steps": planned, "worker": worker, "is_baseline": baseline,
    }
    if state == TrialState.FAIL:
        attrs.update(fail_reason="non-finite loss nan at step 3", train_steps=3)
        evals = {}
    if state == TrialState.COMPLETE:
        attrs["metric_values"] = {"accuracy": value, "macro_f1": value - 0.01}
    done = state == TrialState.COMPLETE
    t = optuna.trial.create_trial(
        state=state, value=value if done and not multi else None,
        values=[value, float(trainable)] if done and multi else None, params=params,
        distributions=DISTRIBUTIONS, user_attrs=attrs,
        # bookkeeping Optuna keeps in system attrs, which tables and exports must leave out
        system_attrs={"nsga2:generation": number // 8, "lora_tune:claim": f"token-{number}"},
        intermediate_values=evals if state != TrialState.FAIL else None)
    t.datetime_start = start
    t.datetime_complete = start + timedelta(seconds=secs + 1)
    return t


def make_lora_study(storage: str | None = None, n: int = 24, seed: int = 0,
                    name: str = "synthetic", with_spec: bool = True, multi: bool = False) -> optuna.Study:
    """A maximise-accuracy study: trial 0 is the baseline, then ``n - 1`` sampled trials.

    ``multi``: objectives (maximise accuracy, minimise trainable_params), no pruned trials.
    """
    rng = random.Random(seed)
    directions = ["maximize", "minimize"] if multi else ["maximize"]
    study = optuna.create_study(study_name=name, storage=storage, directions=directions)
    if with_spec:
        study.set_user_attr("spec", SPEC)
        study.set_user_attr("metrics", ["accuracy", "trainable_params"] if multi else ["accuracy"])
    starts = {"host-a:101": T0, "host-b:202": T0}
    for number in range(n):
        worker = "host-a:101" if number % 2 == 0 else "host-b:202"
        if number == 0:
            params = {"rank": 8, "alpha_ratio": 2.0, "targets": "attention-qv", "quant_bits": 0,
                      "learning_rate": 1e-3, "dropout": 0.0}
        else:
            params = {"rank": rng.choice([2, 4, 8, 16, 32]), "alpha_ratio": rng.choice([0.5, 1.0, 2.0, 4.0]),
                      "targets": rng.choice(PRESETS), "quant_bits": rng.choice([0, 8, 4]),
                      "learning_rate": math.exp(rng.uniform(math.log(1e-4), math.log(3e-3))),
                      "dropout": rng.uniform(0.0, 0.2)}
        quality = (0.5 + 0.08 * math.log2(params["rank"]) + 0.05 * PRESETS.index(params["targets"])
                   - 0.02 * (params["quant_bits"] == 4) + rng.uniform(-0.03, 0.03))
        final = min(quality, 0.99)
        state = TrialState.COMPLETE
        if number and number % 5 == 3 and not multi:
            state = TrialState.PRUNED
        if number and number % 11 == 7:
            state = TrialState.FAIL
        curve = [final * f for f in (0.55, 0.75, 0.9, 1.0)]
        if state == TrialState.PRUNED:
            curve = curve[:2]
        t = trial_record(number, params, state=state, value=final, curve=curve, planned=40,
                         start=starts[worker], worker=worker, baseline=number == 0, multi=multi)
        starts[worker] = t.datetime_complete
        study.add_trial(t)
    return study


def add_trial(study: optuna.Study, value: float, *, trainable: int, memory: int, bits: int = 0,
              rank: int = 8, alpha_ratio: float = 2.0, preset: str = "attention", baseline: bool = False,
              state: TrialState = TrialState.COMPLETE) -> None:
    """Add one hand-made trial (for tests that check exact panel values)."""
    attrs = {"trainable_params": trainable, "peak_memory_bytes": memory, "target_preset": preset,
             "is_baseline": baseline, "worker": "w:1"}
    study.add_trial(optuna.trial.create_trial(
        state=state, value=value if state == TrialState.COMPLETE else None,
        params={"rank": rank, "alpha_ratio": alpha_ratio, "targets": preset, "quant_bits": bits},
        distributions={k: DISTRIBUTIONS[k] for k in ("rank", "alpha_ratio", "targets", "quant_bits")},
        user_attrs=attrs))
