"""Driver overhead of a study: the share of wall time NOT spent in forward/backward/eval.

Runs a study file (default: studies/quickstart.yaml) in this process on a fresh SQLite file
and splits the wall time of ``optimize`` into

* compute: forward, backward and optimizer steps (``TrainResult.compute_seconds``);
* evaluate: ``task.evaluate`` (``TrainResult.eval_seconds``);
* driver: everything else: sampling, storage writes (params, reports, user attributes,
  trial state), building the model copy and injecting LoRA, the train loop's bookkeeping,
  pruning decisions, garbage collection between trials.

    python benchmarks/bench_driver_overhead.py [STUDY.yaml] [--n-trials N] [--storage URL]

Prints a table per trial and the totals; the acceptance bound is driver ≤ 5 % of wall time.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", default=str(ROOT / "studies" / "quickstart.yaml"))
    parser.add_argument("--n-trials", type=int, default=None, help="budget override (default: the file's)")
    parser.add_argument("--storage", default=None, help="default: a fresh SQLite file in a temp dir")
    args = parser.parse_args(argv)

    import optuna

    from lora_tune.study.trial.objective import Objective
    from lora_tune.study.run.runner import create_study, optimize
    from lora_tune.study.schema.spec import load_spec_file, spec_from_stored

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    spec = load_spec_file(args.study)
    if args.n_trials:
        spec.study.n_trials = args.n_trials
    with tempfile.TemporaryDirectory() as tmp:
        url = args.storage or f"sqlite:///{os.path.join(tmp, 'bench.db')}"
        study = create_study(spec, url, name=f"bench-{int(time.time())}")
        resolved = spec_from_stored(study.user_attrs["spec"])
        times: dict[int, object] = {}
        objective = Objective(resolved, on_times=lambda n, t: times.__setitem__(n, t))
        objective.get_task()  # building the task (data, cached pretrained model) is one-off setup
        start = time.perf_counter()
        result = optimize(study, resolved, objective=objective)
        wall = time.perf_counter() - start
        states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
        from lora_tune.study.storage.opening import dispose_storage

        dispose_storage(study._storage)

    print(f"{'trial':>5} {'state':<9} {'total':>7} {'build':>7} {'compute':>8} {'eval':>7} {'other':>7}")
    compute = evaluate = build = in_trial = loop = 0.0
    for n in sorted(times):
        t = times[n]
        other = t.total - t.compute - t.evaluate - t.build
        print(f"{n:>5} {states.get(n, '?'):<9} {t.total:7.2f} {t.build:7.3f} {t.compute:8.2f} "
              f"{t.evaluate:7.2f} {other:7.3f}")
        compute += t.compute
        evaluate += t.evaluate
        build += t.build
        loop += t.train - t.compute - t.evaluate
        in_trial += t.total
    driver = wall - compute - evaluate
    print(f"\n{result.trials_run} trials ({result.states}) in {wall:.1f} s wall")
    print(f"  forward/backward/step {compute:.1f} s, evaluation {evaluate:.1f} s")
    print(f"  driver {driver:.2f} s = {100 * driver / wall:.1f} % of wall time "
          f"(model copy + inject {build:.2f} s, train loop bookkeeping and batching {loop:.2f} s, "
          f"sampling/reporting/attributes in the trials {in_trial - compute - evaluate - build - loop:.2f} s, "
          f"between trials {wall - in_trial:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
