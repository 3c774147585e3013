"""Coordination overhead of workers sharing one storage.

1. Throughput: a 0.5 s objective (5 reports, 0.1 s sleep each), TPE over 4 parameters,
   1 worker vs W workers (separate processes) on PostgreSQL; the speed-up of W workers
   over 1 should approach W. ``--mode plain`` runs the same with plain Optuna
   (``study.optimize`` on ``RDBStorage``, ``MaxTrialsCallback`` for the budget) for reference.
2. Storage time per trial: create, report x5, finish (no sampling, no sleep), in ms, for
   SQLite, journal file and PostgreSQL, through lora-tune's storage and plain Optuna's.

    python benchmarks/bench_storage.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test
    python benchmarks/bench_storage.py --postgres URL --workers 8 --trials-per-worker 12 --mode both
    python benchmarks/bench_storage.py --postgres URL --profile   # CPU and SQL per trial, by layer

The benchmark creates and drops its own database next to the one in the URL.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import warnings
warnings.filterwarnings("ignore", message="Heartbeat of storage")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lora_tune.study.storage import dispose_storage, mask_url, open_storage  # noqa: E402
from lora_tune.study.workers import run_worker  # noqa: E402

SLEEP, REPORTS = 0.5, 5


def objective(trial: optuna.Trial) -> float:
    a = trial.suggest_float("a", 1e-4, 1e-1, log=True)
    b = trial.suggest_int("b", 1, 64, log=True)
    c = trial.suggest_categorical("c", ["qv", "attention", "mlp", "all"])
    d = trial.suggest_float("d", 0.0, 0.3)
    value = a * b + d + len(c)
    for step in range(REPORTS):
        time.sleep(SLEEP / REPORTS)
        trial.report(value + step, step)
    return value


# --------------------------------------------------------------------------- worker processes
def worker_main(mode: str, url: str, name: str, budget: int) -> None:
    """One worker process; prints the CPU seconds its trial loop used (imports excluded)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sampler = optuna.samplers.TPESampler(seed=os.getpid())
    if mode == "plain":
        study = optuna.load_study(study_name=name, storage=url, sampler=sampler)
        callback = optuna.study.MaxTrialsCallback(budget, states=None)
        start = time.process_time()
        study.optimize(objective, callbacks=[callback])
    else:
        storage = open_storage(url)
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        start = time.process_time()
        run_worker(study, objective, budget=budget, reseed=False)
        dispose_storage(storage)
    print(f"CPU {time.process_time() - start}", flush=True)


def throughput(mode: str, url: str, workers: int, trials: int) -> dict[str, float]:
    name = f"bench-{mode}-{workers}-{uuid.uuid4().hex[:6]}"
    if mode == "plain":
        optuna.create_study(study_name=name, storage=url)
    else:
        storage = open_storage(url)
        optuna.create_study(study_name=name, storage=storage)
        dispose_storage(storage)
    start = time.perf_counter()
    cmd = [sys.executable, __file__, "--worker", mode, url, name, str(trials)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(workers)]
    cpu = 0.0
    for p in procs:
        out, _ = p.communicate()
        cpu += sum(float(line.split()[1]) for line in out.splitlines() if line.startswith("CPU "))
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=url)
    done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    first = min(t.datetime_start for t in done)
    last = max(t.datetime_complete for t in done)
    span = (last - first).total_seconds()
    return {"trials": len(done), "span_s": span, "wall_s": wall, "trials_per_s": len(done) / span,
            "cpu_per_trial_s": cpu / len(done)}


# -------------------------------------------------------------------------- storage time/trial
def storage_time(url: str, wrapped: bool, n: int = 40) -> float:
    storage = open_storage(url) if wrapped else optuna.storages.get_storage(
        optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url.split(":", 1)[1]))
        if url.startswith("journal:") else url)
    study = optuna.create_study(study_name=f"st-{uuid.uuid4().hex[:6]}", storage=storage,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        trial = study.ask()
        for step in range(REPORTS):
            trial.report(float(step), step)
        study.tell(trial, 1.0)
        times.append(time.perf_counter() - t0)
    if wrapped:
        dispose_storage(storage)
    return statistics.median(times[5:]) * 1000


@contextlib.contextmanager
def scratch_database(base: str):
    import sqlalchemy as sa

    name = f"lora_tune_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def profile(url: str, trials: int) -> None:
    """Where one worker's CPU goes: sampling (TPE minus random) vs storage and bookkeeping."""
    import sqlalchemy as sa

    global SLEEP
    SLEEP = 0.0
    print(f"\n{trials} trials in one process, no sleep; CPU ms per trial and SQL statements per trial")
    print("\n| storage layer | sampler | CPU ms/trial | SQL statements/trial |")
    print("|---|---|---|---|")
    for sampler_name in ("random", "tpe"):
        for layer in ("plain Optuna", "lora-tune"):
            sampler = (optuna.samplers.RandomSampler(seed=0) if sampler_name == "random"
                       else optuna.samplers.TPESampler(seed=0))
            if layer == "plain Optuna":
                rdb = optuna.storages.RDBStorage(url)
                storage, engine = optuna.storages.get_storage(rdb), rdb.engine
            else:
                storage = open_storage(url)
                engine = storage.rdb.engine
            statements = [0]
            sa.event.listen(engine, "before_cursor_execute", lambda *a, **k: statements.__setitem__(0, statements[0] + 1))
            study = optuna.create_study(study_name=f"prof-{uuid.uuid4().hex[:6]}", storage=storage, sampler=sampler)
            statements[0] = 0
            start = time.process_time()
            if layer == "plain Optuna":
                study.optimize(objective, n_trials=trials)
            else:
                run_worker(study, objective, budget=trials, reseed=False)
            cpu = (time.process_time() - start) / trials * 1000
            print(f"| {layer} | {sampler_name} | {cpu:.1f} | {statements[0] / trials:.0f} |", flush=True)
            dispose_storage(storage)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, url, name, budget = sys.argv[2:6]
        worker_main(mode, url, name, int(budget))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default=os.environ.get("LORA_TUNE_TEST_POSTGRES_URL",
                                                             "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trials-per-worker", type=int, default=12)
    parser.add_argument("--mode", choices=["lora-tune", "plain", "both"], default="lora-tune")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-storage", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with scratch_database(args.postgres) as pg:
        print(f"PostgreSQL: {mask_url(args.postgres)} (scratch database)")
        if args.profile:
            profile(pg, 100)
            return
        if not args.skip_throughput:
            modes = ["lora-tune", "plain"] if args.mode == "both" else [args.mode]
            print(f"\n| storage layer | workers | trials | trials/s | speed-up | CPU/trial, trial loop (ms) |")
            print("|---|---|---|---|---|---|")
            for mode in modes:
                one = throughput(mode, pg, 1, args.trials_per_worker)
                many = throughput(mode, pg, args.workers, args.trials_per_worker * args.workers)
                for w, r in ((1, one), (args.workers, many)):
                    print(f"| {mode} | {w} | {r['trials']} | {r['trials_per_s']:.2f} | "
                          f"{r['trials_per_s'] / one['trials_per_s']:.2f}x | {r['cpu_per_trial_s'] * 1000:.0f} |",
                          flush=True)
        if not args.skip_storage:
            with tempfile.TemporaryDirectory() as tmp:
                urls = {"SQLite": "sqlite:///{}/{}.db", "journal file": "journal:{}/{}.log", "PostgreSQL": pg}
                print("\n| storage | lora-tune ms/trial | plain Optuna ms/trial |")
                print("|---|---|---|")
                for label, url in urls.items():  # separate files: SQLite's WAL mode sticks to a file
                    ours = storage_time(url.format(tmp, "ours"), wrapped=True)
                    plain = storage_time(url.format(tmp, "plain"), wrapped=False)
                    print(f"| {label} | {ours:.1f} | {plain:.1f} |", flush=True)


if __name__ == "__main__":
    main()
