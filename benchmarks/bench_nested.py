"""Do nested ranks hold? Each truncated rank of one nested training against a plain adapter of that rank.

Issue 20 asks that ``rank: {nested: [...]}`` stay out of ``lora-tune init``'s defaults until every
truncated rank of a trained adapter scores at least what a plain adapter of that rank scores at
the same budget. This measures exactly that, on the tuned pair (TREC, Subj; ``../shared/data``)
with ``bench_search.py``'s per-trial budget and data splits: for each config (targets, alpha
ratio, learning rate) and seed, one ``lora-tune run`` trains ``rank: {nested: RANKS}`` (nested
rank dropout, one training, one result per rank) and one trains each rank plainly (the grid
sampler over ``rank: {choices: RANKS}``). Divergence stopping and pruning are off, so every
training runs all its steps and every rank is scored.

    python benchmarks/bench_nested.py                  # 2 data sets x 2 configs x 2 seeds, about 15 minutes on 2 cores
    python benchmarks/bench_nested.py --datasets trec --seeds 0
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

HERE = Path(__file__).resolve().parent
RANKS = [4, 8, 16, 32]
# (targets, alpha ratio, learning rate): the failing case (all-linear, alpha = 2r, 1e-3)
# and the attention q/v config that learned there
CONFIGS = [("all-linear", 2, 1e-3), ("attention-qv", 1, 2e-3)]


def _bench_search() -> Any:
    spec = importlib.util.spec_from_file_location("bench_search", HERE / "bench_search.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def study_file(name: str, nested: bool, config: tuple[str, int, float], seed: int, train: Path, dev: Path,
               args: argparse.Namespace) -> dict[str, Any]:
    targets, ratio, lr = config
    return {
        "study": {"name": name, "direction": "maximize", "metric": "accuracy",
                  "sampler": {"type": "tpe" if nested else "grid", "seed": seed}, "pruner": {"type": "none"},
                  "n_trials": 1 if nested else len(RANKS), "baseline": False},
        "task": {"type": "text-classification", "model": "minilm", "train_file": str(train), "eval_file": str(dev),
                 "max_length": args.max_length, "seed": 0},
        "search_space": {"rank": {"nested": RANKS} if nested else {"choices": RANKS}, "alpha": {"ratio": [ratio]},
                         "targets": targets, "dropout": 0.1, "learning_rate": lr},
        "train": {"epochs": 1, "batch_size": args.batch_size, "evals_per_epoch": 4, "seed": seed, "device": "cpu",
                  "threads": args.threads, "diverged_after": None},
    }


def run(bench: Any, raw: dict[str, Any], work: Path) -> dict[int, float]:
    """``lora-tune run`` the study (``bench_search.run_study``); each rank's accuracy."""
    study, _ = bench.run_study(raw, work)
    return {int(t.params["rank"]): float(t.value) for t in study.get_trials(deepcopy=False) if t.value is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench = _bench_search()
    parser.add_argument("--datasets", nargs="+", default=list(bench.TUNED), choices=list(bench.TUNED))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--train-examples", type=int, default=1200)
    parser.add_argument("--dev-examples", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-nested-") as tmp:
        work = Path(tmp)
        for data in args.datasets:
            train, dev = bench.split_data(data, work, args.train_examples, args.dev_examples, 0)
            for config in CONFIGS:
                key = f"{data} {config[0]} alpha={config[1]}r lr={config[2]:g}"
                runs: dict[str, list[dict[int, float]]] = {"nested": [], "plain": []}
                for seed in args.seeds:
                    for kind in runs:
                        name = f"{data}-{config[0]}-{config[1]}-{kind}-{seed}"
                        runs[kind].append(run(bench, study_file(name, kind == "nested", config, seed, train, dev,
                                                                args), work))
                out[key] = runs
                print(table(key, runs), flush=True)
                if args.json:
                    args.json.write_text(json.dumps(out, indent=1))
    print(f"\n{time.perf_counter() - start:.0f} s", flush=True)
    return 0


def table(key: str, runs: dict[str, list[dict[int, float]]]) -> str:
    """Per rank: the plain adapter's and the truncation's accuracy (mean over seeds, and each seed)."""
    lines = [f"\n{key} ({len(runs['plain'])} seeds)", "| rank | plain | truncated (nested) | truncated - plain |",
             "|---:|---|---|---:|"]
    for r in RANKS:
        plain = [s[r] for s in runs["plain"] if r in s]
        nested = [s[r] for s in runs["nested"] if r in s]
        if plain and nested:
            diff = statistics.fmean(nested) - statistics.fmean(plain)
            lines.append(f"| {r} | {statistics.fmean(plain):.3f} ({', '.join(f'{v:.3f}' for v in plain)}) "
                         f"| {statistics.fmean(nested):.3f} ({', '.join(f'{v:.3f}' for v in nested)}) | {diff:+.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
