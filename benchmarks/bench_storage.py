"""Coordination overhead of workers sharing one study, at realistic trial lengths.

Each worker process (after one warm-up trial without sleep in a scratch study: imports, first
queries, once per process) runs one trial of the toy objective: TPE over 4 parameters, ``--sleep``
seconds of "training" (default 30) with ``--reports`` intermediate reports (default 5); the
trials start spread over one trial length, as trials of long-running workers are (``--together``:
all at the same instant, as at a job's start). What
the worker spends outside the objective's sleep - starting the trial under the budget lock,
sampling, the reports, heartbeats, finishing it - is the coordination overhead, reported as
a share of the trial's time. 1, 8 and 32 workers, on PostgreSQL directly and through one
``lora-tune storage-proxy``; the budget (one trial per worker) must come out exact, and the
PostgreSQL connections lora-tune held are sampled throughout (``pg_stat_activity``).

    python benchmarks/bench_storage.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test
    python benchmarks/bench_storage.py --workers 1,8 --modes direct --sleep 5   # a quick look
    python benchmarks/bench_storage.py --together   # every trial starting at the same instant

The worker processes import neither torch nor the LoRA code (light enough for 32 on 2 cores);
they start their trials together, once every one of them has imported and loaded the study.
The benchmark creates and drops its own database next to the one in the URL.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lora_tune.study.storage.opening import dispose_storage, mask_url, open_storage  # noqa: E402
from lora_tune.study.run.workers import run_worker  # noqa: E402


# --------------------------------------------------------------------------- one worker process
def worker_main(url: str, name: str, sleep: float, reports: int, delay: float) -> None:
    """Run trials until the budget is used; print one JSON line of timings per trial."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(url, proxy_wait_seconds=120)
    timings: list[dict[str, float]] = []
    mark: dict[str, float] = {}
    # warm-up, once per process: one trial without sleep in the warm-up study (first queries
    # compiled, code paths loaded) - paid once per worker, not per trial; reported apart
    warm = optuna.load_study(study_name=name + "-warm-up", storage=storage)
    start = time.perf_counter()
    run_worker(warm, lambda t: _toy(t, 0.0, reports), n_trials=1, reseed=False)
    warm_up_s = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=optuna.samplers.TPESampler(seed=os.getpid()))

    def objective(trial: optuna.Trial) -> float:
        mark["objective_start"] = time.perf_counter()
        a = trial.suggest_float("a", 1e-4, 1e-1, log=True)
        b = trial.suggest_int("b", 1, 64, log=True)
        c = trial.suggest_categorical("c", ["qv", "attention", "mlp", "all"])
        d = trial.suggest_float("d", 0.0, 0.3)
        value, slept = a * b + d + len(c), 0.0
        for step in range(reports):
            t0 = time.perf_counter()
            time.sleep(sleep / reports)
            slept += time.perf_counter() - t0
            trial.report(value + step, step)
        mark["slept"] = slept
        return value

    def told(study_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        end = time.perf_counter()
        cpu = time.process_time()
        timings.append({"trial_s": end - mark["loop_start"], "sleep_s": mark["slept"],
                        "before_objective_s": mark["objective_start"] - mark["loop_start"],
                        "cpu_s": cpu - mark["cpu_start"]})
        mark["loop_start"], mark["cpu_start"] = end, cpu  # the next trial's coordination starts now

    print("ready", flush=True)  # imports done and the study loaded: wait for every worker
    sys.stdin.readline()
    time.sleep(delay)  # steady state: the workers' trials are out of phase (see --together)
    mark["loop_start"], mark["cpu_start"] = time.perf_counter(), time.process_time()
    stats = run_worker(study, objective, callbacks=[told], wait_for_running=False, reseed=False)
    dispose_storage(storage)
    print(json.dumps({"timings": timings, "trials": stats.trials, "warm_up_s": warm_up_s}), flush=True)


def _toy(trial: optuna.Trial, sleep: float, reports: int) -> float:
    value = trial.suggest_float("a", 1e-4, 1e-1, log=True) * trial.suggest_int("b", 1, 64, log=True)
    for step in range(reports):
        time.sleep(sleep / reports)
        trial.report(value + step, step)
    return value


# --------------------------------------------------------------------------- the measurement
def connections(url: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = :d AND application_name = 'lora-tune'"
            ), {"d": sa.engine.make_url(url).database}).scalar_one())
    finally:
        engine.dispose()


def run(pg: str, mode: str, workers: int, sleep: float, reports: int, together: bool) -> dict[str, float]:
    name = f"bench-{mode}-{workers}-{uuid.uuid4().hex[:6]}"
    storage = open_storage(pg)
    study = optuna.create_study(study_name=name, storage=storage)
    study.set_user_attr("n_trials", workers)  # the budget: one trial per worker
    optuna.create_study(study_name=name + "-warm-up", storage=storage)
    dispose_storage(storage)
    proxy = None
    url = pg
    if mode == "proxy":
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if k != "LORA_TUNE_STORAGE"}
        proxy = subprocess.Popen([sys.executable, "-m", "lora_tune.cli.main", "storage-proxy", "--storage", pg,
                                  "--port", str(port), "--max-connections", "8"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"grpc://127.0.0.1:{port}"
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append(connections(pg))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    delays = [0.0 if together else i * sleep / workers for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", url, name, str(sleep), str(reports), str(d)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for d in delays]
    for p in procs:  # start the trials together, once every worker has imported and loaded the study
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    timings: list[dict[str, float]] = []
    warm_ups: list[float] = []
    for p in procs:
        out, _ = p.communicate()
        for line in out.splitlines():
            if line.startswith("{"):
                timings += json.loads(line)["timings"]
                warm_ups.append(json.loads(line)["warm_up_s"])
    stop.set()
    sampler.join()
    if proxy is not None:
        proxy.terminate()
        proxy.wait()
    check = open_storage(pg)
    finished = [t for t in optuna.load_study(study_name=name, storage=check).get_trials(deepcopy=False)]
    dispose_storage(check)
    overhead = [t["trial_s"] - t["sleep_s"] for t in timings]
    return {
        "trials": len(finished), "complete": sum(t.state.name == "COMPLETE" for t in finished),
        "overhead_ms": statistics.median(overhead) * 1000, "overhead_max_ms": max(overhead) * 1000,
        "share": statistics.median(t["trial_s"] - t["sleep_s"] for t in timings) / statistics.median(
            t["trial_s"] for t in timings),
        "share_max": max((t["trial_s"] - t["sleep_s"]) / t["trial_s"] for t in timings),
        "before_ms": statistics.median(t["before_objective_s"] for t in timings) * 1000,
        "cpu_ms": statistics.median(t["cpu_s"] for t in timings) * 1000,
        "connections_max": max(samples) if samples else 0,
        "warm_up_ms": statistics.median(warm_ups) * 1000,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        url, name, sleep, reports, delay = sys.argv[2:7]
        worker_main(url, name, float(sleep), int(reports), float(delay))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default=os.environ.get("LORA_TUNE_TEST_POSTGRES_URL",
                                                             "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--workers", default="1,8,32", help="comma-separated worker counts")
    parser.add_argument("--modes", default="direct,proxy", help="direct, proxy or both")
    parser.add_argument("--sleep", type=float, default=30.0, help="seconds of sleep per trial")
    parser.add_argument("--reports", type=int, default=5, help="intermediate reports per trial")
    parser.add_argument("--together", action="store_true",
                        help="start every worker's trial at the same instant (a job's first trials) instead "
                             "of spread over one trial length (the steady state)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with scratch_database(args.postgres) as pg:
        start = "started together" if args.together else "started spread over one trial length"
        print(f"PostgreSQL: {mask_url(args.postgres)} (scratch database); {args.sleep:g} s sleep and "
              f"{args.reports} reports per trial, one trial per worker, {start}\n")
        print("| storage | workers | trials (budget) | overhead/trial, median (max) | share of trial time, "
              "median (max) | before the objective | worker CPU/trial | PostgreSQL connections, max | "
              "process warm-up (once) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for mode in args.modes.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                r = run(pg, mode, workers, args.sleep, args.reports, args.together)
                label = "PostgreSQL directly" if mode == "direct" else "through storage-proxy"
                print(f"| {label} | {workers} | {r['trials']} ({workers}) | {r['overhead_ms']:.0f} ms "
                      f"({r['overhead_max_ms']:.0f} ms) | {r['share'] * 100:.2f} % ({r['share_max'] * 100:.2f} %) | "
                      f"{r['before_ms']:.0f} ms | {r['cpu_ms']:.0f} ms | {r['connections_max']} | "
                      f"{r['warm_up_ms']:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
