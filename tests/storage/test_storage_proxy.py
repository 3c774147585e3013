"""Many workers through one `lora-tune storage-proxy` (Optuna's gRPC storage proxy) on a real
PostgreSQL server: exact budget, grid points never evaluated twice, database connections
bounded by the proxy's pool; and the bad input and outages a user meets."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import optuna
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from tcp_proxy import OutageProxy
from workerlib import REPO, by_state, finish, make_study, start_workers

from lora_tune.cli.main import cli
from lora_tune.errors import StorageError
from lora_tune.study import storage as st
from lora_tune.study.storages.budget import BudgetReached
from lora_tune.study.storages.marks import WORKER_KEY

optuna.logging.set_verbosity(optuna.logging.WARNING)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proxy:
    """A `lora-tune storage-proxy` process; ``url`` is what workers pass as --storage."""

    def __init__(self, storage_url: str, *args: str):
        self.port = free_port()
        self.url = f"grpc://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.pop("LORA_TUNE_STORAGE", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lora_tune.cli.main", "storage-proxy", "--storage", storage_url,
             "--port", str(self.port), *args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.storage = st.open_storage(self.url, proxy_wait_seconds=60)  # waits until it answers

    def stop(self) -> str:
        st.dispose_storage(self.storage)
        self.process.terminate()
        out, _ = self.process.communicate(timeout=30)
        return out


class ConnectionCounter:
    """Samples, while running, the connections lora-tune holds to one PostgreSQL database."""

    def __init__(self, url: str):
        self.url, self.database = url, sa.engine.make_url(url).database
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            count = conn.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = :d AND application_name = 'lora-tune'"
            ), {"d": self.database}).scalar_one()
        engine.dispose()
        return int(count)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append(self.now())

    def __enter__(self) -> ConnectionCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.postgres
@pytest.mark.slow
def test_32_workers_through_one_proxy(fresh_postgres):
    """Exact budget, every grid point once, and at most the proxy's pool of connections."""
    search_space = {"x": [float(v) for v in range(6)], "y": list(range(8))}
    max_connections = 4
    proxy = Proxy(fresh_postgres, "--max-connections", str(max_connections), "--threads", "16")
    try:
        sampler = optuna.samplers.GridSampler(search_space, seed=0)
        study = make_study(proxy.url, "many", 51, sampler=sampler, sleep=0.3,
                           sampler_options={"type": "grid", "search_space": search_space, "seed": 0})
        # three queued off-grid trials take numbers 0-2: the last grid points are then picked
        # by trials numbered past the grid size, where GridSampler chooses at random
        for x in (50.0, 60.0, 70.0):
            study.enqueue_trial({"x": x, "y": 99})
        with ConnectionCounter(fresh_postgres) as counter:
            results = finish(start_workers(proxy.url, "many", 32, objective="grid_objective"), timeout=600)
        for code, output in results:
            assert code == 0, output
            assert "Traceback" not in output, output
        trials = study.get_trials(deepcopy=False)
        assert by_state(trials) == {"COMPLETE": 51}
        assert sorted(t.number for t in trials) == list(range(51))
        points = [(t.params["x"], t.params["y"]) for t in trials if "grid_id" in t.system_attrs]
        assert len(points) == 48 and len(set(points)) == 48
        assert len({t.system_attrs[WORKER_KEY] for t in trials}) >= 16  # the work really was shared
        assert counter.samples and max(counter.samples) <= max_connections, counter.samples
    finally:
        proxy.stop()


@pytest.mark.postgres
def test_budget_is_enforced_behind_the_proxy(fresh_postgres):
    proxy = Proxy(fresh_postgres)
    try:
        study = make_study(proxy.url, "two", 2)
        for _ in range(2):
            study.tell(study.ask(), 1.0)
        with pytest.raises(BudgetReached, match="2 of 2"):
            study.ask()
        assert len(study.get_trials()) == 2  # nothing was written
        direct = st.open_storage(fresh_postgres)  # the database holds the same study
        assert len(optuna.load_study(study_name="two", storage=direct).trials) == 2
        st.dispose_storage(direct)
    finally:
        proxy.stop()


@pytest.mark.postgres
def test_database_outage_behind_the_proxy_is_retried_and_nothing_is_lost(postgres_url):
    base = sa.engine.make_url(postgres_url)
    link = OutageProxy((base.host or "127.0.0.1", base.port or 5432))
    proxy = Proxy(link.url(postgres_url), "--retry-seconds", "1")
    try:
        study = make_study(proxy.url, "outage-behind-proxy", 3)
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        link.cut()
        threading.Timer(3.0, link.restore).start()
        start = time.monotonic()
        trial.report(0.5, 0)  # the proxy gives up after 1 s; the worker keeps retrying
        study.tell(trial, 1.0)
        assert time.monotonic() - start >= 2.0
        assert proxy.storage.retries + study._storage.retries >= 1
        finished = study.get_trials()
        assert by_state(finished) == {"COMPLETE": 1} and finished[0].intermediate_values == {0: 0.5}
    finally:
        out = proxy.stop()
        link.close()
    assert "retry" in out  # the proxy logged its own retries (password masked, none here)


@pytest.mark.postgres
def test_proxy_whose_database_stays_down_is_a_clear_error(postgres_url):
    base = sa.engine.make_url(postgres_url)
    link = OutageProxy((base.host or "127.0.0.1", base.port or 5432))
    proxy = Proxy(link.url(postgres_url), "--retry-seconds", "1")
    try:
        client = st.open_storage(proxy.url, retry_seconds=2)
        link.cut()
        with pytest.raises(StorageError) as info:
            client.get_all_studies()
        message = str(info.value)
        assert proxy.url in message and "did not answer" in message and "storage proxy" in message
        st.dispose_storage(client)
    finally:
        link.restore()
        proxy.stop()
        link.close()


def test_unreachable_proxy_is_a_clear_error():
    url = f"grpc://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError) as info:
        st.open_storage(url, proxy_wait_seconds=1)
    assert url in str(info.value) and "lora-tune storage-proxy" in str(info.value)
    result = CliRunner().invoke(cli, ["worker", "s", "--storage", url, "--objective", "math:sqrt"])
    assert result.exit_code == 1 and url in result.output and "storage-proxy" in result.output


@pytest.mark.parametrize("url", ["grpc://127.0.0.1", "grpc://proxy-host/"])
def test_grpc_url_without_port_is_bad_input(url):
    result = CliRunner().invoke(cli, ["worker", "s", "--storage", url, "--objective", "math:sqrt"])
    assert result.exit_code == 2, result.output
    assert "grpc://HOST:PORT" in result.output and "--port" in result.output


@pytest.mark.parametrize("storage, field", [("journal:x.log", "--storage"), ("grpc://h:1", "--storage"),
                                            ("notadb://x", "storage")])
def test_proxy_refuses_what_it_cannot_serve(storage, field):
    result = CliRunner().invoke(cli, ["storage-proxy", "--storage", storage, "--port", "1"])
    assert result.exit_code == 2, result.output
    assert f"{field}:" in result.output


def test_proxy_needs_two_connections():
    result = CliRunner().invoke(cli, ["storage-proxy", "--storage", "sqlite:///x.db", "--max-connections", "1"])
    assert result.exit_code == 2 and "--max-connections" in result.output


def test_proxy_whose_database_is_unreachable_at_start_says_so():
    url = "postgresql+psycopg://bob:hunter2@127.0.0.1:1/db"
    result = CliRunner().invoke(cli, ["storage-proxy", "--storage", url, "--port", str(free_port())])
    assert result.exit_code == 1, result.output
    assert "hunter2" not in result.output and "bob:***@127.0.0.1:1/db" in result.output
    assert "cannot open storage" in result.output
