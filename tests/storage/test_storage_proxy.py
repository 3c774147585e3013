"""Many workers through one `lora-tune storage-proxy` (Optuna's gRPC storage proxy) on a real
PostgreSQL server: exact budget, grid points never evaluated twice, database connections
bounded by the proxy's pool; and the bad input and outages a user meets."""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import warnings

import grpc
import optuna
import proxylib
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from tcp_proxy import OutageProxy
from workerlib import REPO, by_state, finish, make_study, start_workers

from lora_tune.cli.main import cli
from lora_tune.errors import ConfigError, StorageError
from lora_tune.study.storage import opening as st
from lora_tune.study.storage.proxy_server import make_server
from lora_tune.study.storage.budget import BudgetReached
from lora_tune.study.storage.proxy_client import ENV_PROXY_CA, ENV_PROXY_TOKEN, ENV_PROXY_TOKEN_FILE
from lora_tune.study.storage.marks import WORKER_KEY

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
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_TUNE_PROXY_")}
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


# -- who may call the proxy: a token (and TLS) beyond this machine ------------------------------

@pytest.fixture
def no_proxy_env(monkeypatch):
    for name in (ENV_PROXY_TOKEN, ENV_PROXY_TOKEN_FILE, ENV_PROXY_CA):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    return proxylib.self_signed(tmp_path_factory.mktemp("tls"))


def _plain_optuna_client(url: str) -> optuna.storages.GrpcStorageProxy:
    host, port = url.removeprefix("grpc://").rsplit(":", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.GrpcStorageProxy(host=host, port=int(port))


def test_a_call_without_the_token_is_unauthenticated(tmp_path, no_proxy_env):
    database = f"sqlite:///{tmp_path / 'p.db'}"
    with proxylib.serving(database, proxylib.access()) as url:
        # the study is there: made through the proxy with the token
        no_proxy_env.setenv(ENV_PROXY_TOKEN, proxylib.TOKEN)
        owner = st.open_storage(url)
        optuna.create_study(study_name="guarded", storage=owner).set_user_attr("spec", {"study": {}})
        no_proxy_env.delenv(ENV_PROXY_TOKEN)
        # a plain Optuna client has no way to send a token: every call is refused
        plain = _plain_optuna_client(url)
        for call in (plain.get_all_studies, lambda: plain.delete_study(1),
                     lambda: plain.set_study_user_attr(1, "spec", {"study": {"objective": "os:system"}}),
                     lambda: plain.create_new_study([optuna.study.StudyDirection.MINIMIZE], "intruder")):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        plain.close()
        # nothing changed
        (study,) = owner.get_all_studies()
        assert study.study_name == "guarded" and study.user_attrs["spec"] == {"study": {}}
        # lora-tune's client says what to set, instead of a gRPC traceback
        with pytest.raises(StorageError) as info:
            st.open_storage(url)
        message = str(info.value)
        assert ENV_PROXY_TOKEN in message and url in message and "sent none" in message
        result = CliRunner().invoke(cli, ["worker", "guarded", "--storage", url, "--objective", "math:sqrt"])
        assert result.exit_code == 1, result.output
        assert ENV_PROXY_TOKEN in result.output and "Traceback" not in result.output
        st.dispose_storage(owner)


def test_a_wrong_token_is_refused(tmp_path, no_proxy_env):
    with proxylib.serving(f"sqlite:///{tmp_path / 'p.db'}", proxylib.access()) as url:
        no_proxy_env.setenv(ENV_PROXY_TOKEN, "not-the-token-" + "x" * 20)
        with pytest.raises(StorageError) as info:
            st.open_storage(url)
        assert ENV_PROXY_TOKEN in str(info.value) and "is not the proxy's" in str(info.value)
        # raw calls: a wrong bearer token, a prefix of the right one, the token without "Bearer "
        with grpc.insecure_channel(url.removeprefix("grpc://")) as channel:
            call = channel.unary_unary("/optuna.StorageService/GetAllStudies")
            for sent in ("Bearer not-the-token", f"Bearer {proxylib.TOKEN[:-1]}", proxylib.TOKEN):
                with pytest.raises(grpc.RpcError) as raw:
                    call(b"", metadata=(("authorization", sent),), timeout=10)
                assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert call(b"", metadata=(("authorization", f"Bearer {proxylib.TOKEN}"),), timeout=10) == b""


def test_the_right_token_works_from_the_env_or_a_file(tmp_path, no_proxy_env):
    with proxylib.serving(f"sqlite:///{tmp_path / 'p.db'}", proxylib.access()) as url:
        no_proxy_env.setenv(ENV_PROXY_TOKEN, f"  {proxylib.TOKEN}\n")  # a Secret's trailing newline is fine
        storage = st.open_storage(url)
        study = optuna.create_study(study_name="ok", storage=storage)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
        st.dispose_storage(storage)
        no_proxy_env.delenv(ENV_PROXY_TOKEN)
        no_proxy_env.setenv(ENV_PROXY_TOKEN_FILE, str(proxylib.token_file(tmp_path)))
        storage = st.open_storage(url)
        assert len(optuna.load_study(study_name="ok", storage=storage).trials) == 3
        # the client survives pickling with its token (Optuna's client is picklable)
        again = pickle.loads(pickle.dumps(storage.innermost()))
        assert [s.study_name for s in again.get_all_studies()] == ["ok"]
        again.close()
        st.dispose_storage(storage)
        # both set is ambiguous
        no_proxy_env.setenv(ENV_PROXY_TOKEN, proxylib.TOKEN)
        with pytest.raises(ConfigError, match=ENV_PROXY_TOKEN_FILE):
            st.open_storage(url)


def test_tls_with_the_ca_works_and_without_it_fails(tmp_path, tls_pair, no_proxy_env):
    cert, _ = tls_pair
    with proxylib.serving(f"sqlite:///{tmp_path / 'p.db'}", proxylib.access(tls=tls_pair)) as url:
        no_proxy_env.setenv(ENV_PROXY_TOKEN, proxylib.TOKEN)
        no_proxy_env.setenv(ENV_PROXY_CA, str(cert))
        storage = st.open_storage(url)
        optuna.create_study(study_name="tls", storage=storage).optimize(lambda t: t.suggest_int("n", 0, 3), n_trials=2)
        st.dispose_storage(storage)
        no_proxy_env.delenv(ENV_PROXY_CA)  # plaintext to a TLS proxy
        with pytest.raises(StorageError) as info:
            st.open_storage(url, proxy_wait_seconds=1)
        assert ENV_PROXY_CA in str(info.value) and "cannot reach" in str(info.value)
        no_proxy_env.setenv(ENV_PROXY_CA, "system")  # TLS, but the self-signed certificate is not trusted
        with pytest.raises(StorageError) as info:
            st.open_storage(url, proxy_wait_seconds=1)
        assert ENV_PROXY_CA in str(info.value) and "CERTIFICATE_VERIFY_FAILED" in str(info.value)
        plain = _plain_optuna_client(url)  # Optuna's own client speaks plaintext only
        with pytest.raises(ConnectionError):
            plain.wait_server_ready(timeout=1)
        plain.close()


def test_non_loopback_host_without_token_is_bad_input(tmp_path, no_proxy_env):
    database = f"sqlite:///{tmp_path / 'p.db'}"
    for host in ("0.0.0.0", "10.1.2.3", "::", "proxy.example.org"):
        result = CliRunner().invoke(cli, ["storage-proxy", "--storage", database, "--host", host,
                                          "--port", str(free_port())])
        assert result.exit_code == 2, result.output
        assert "--host:" in result.output and "127.0.0.1" in result.output and "--token-file" in result.output
        assert "--insecure" in result.output
    assert not (tmp_path / "p.db").exists()  # refused before opening anything
    with pytest.raises(ConfigError, match="--host"):  # the library refuses too
        make_server(None, host="0.0.0.0", port=0)


@pytest.mark.parametrize("content, mode, expected", [
    ("", 0o600, "non-empty token"),
    ("   \n", 0o600, "non-empty token"),
    ("short", 0o600, "at least 16"),
    ("has spaces in the middle of it", 0o600, "without spaces"),
    (proxylib.TOKEN, 0o644, "chmod 600"),
])
def test_bad_token_file_is_bad_input(tmp_path, content, mode, expected):
    path = proxylib.token_file(tmp_path, content, mode)
    result = CliRunner().invoke(cli, ["storage-proxy", "--storage", f"sqlite:///{tmp_path / 'p.db'}",
                                      "--host", "0.0.0.0", "--token-file", str(path)])
    assert result.exit_code == 2, result.output
    assert "--token-file:" in result.output and expected in result.output
    assert proxylib.TOKEN not in result.output


def test_missing_files_and_half_a_tls_pair_are_bad_input(tmp_path, tls_pair):
    cert, key = tls_pair
    database = f"sqlite:///{tmp_path / 'p.db'}"
    token = str(proxylib.token_file(tmp_path))
    for args, field in [(["--token-file", str(tmp_path / "none")], "--token-file"),
                        (["--token-file", token, "--tls-cert", str(cert)], "--tls-key"),
                        (["--token-file", token, "--tls-key", str(key)], "--tls-cert"),
                        (["--token-file", token, "--tls-cert", str(key), "--tls-key", str(key)], "--tls-cert"),
                        (["--token-file", token, "--tls-cert", str(cert), "--tls-key", str(cert)], "--tls-key")]:
        result = CliRunner().invoke(cli, ["storage-proxy", "--storage", database, *args])
        assert result.exit_code == 2, (args, result.output)
        assert f"{field}:" in result.output, (args, result.output)


def _started(proxy: subprocess.Popen, marker: str) -> str:
    """The proxy's output up to the line holding ``marker`` (it is then listening)."""
    seen = []
    for line in proxy.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError("".join(seen))


def test_insecure_serves_anyone_with_a_warning(tmp_path, no_proxy_env):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_TUNE_")}
    proxy = subprocess.Popen(
        [sys.executable, "-m", "lora_tune.cli.main", "storage-proxy", "--storage", f"sqlite:///{tmp_path / 'p.db'}",
         "--host", "0.0.0.0", "--port", str(port), "--insecure"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = _started(proxy, "storage proxy for")
        assert "WARNING: --insecure" in out and "without a token" in out and "no token" in out
        client = st.open_storage(f"grpc://127.0.0.1:{port}", proxy_wait_seconds=60)
        assert client.get_all_studies() == []
        st.dispose_storage(client)
    finally:
        proxy.terminate()
        proxy.communicate(timeout=30)


def test_cli_proxy_with_token_and_tls_serves_a_worker(tmp_path, tls_pair, no_proxy_env):
    cert, key = tls_pair
    token = proxylib.token_file(tmp_path)
    database = f"sqlite:///{tmp_path / 'p.db'}"
    no_proxy_env.setenv(ENV_PROXY_TOKEN_FILE, str(token))  # this test's clients; the proxy gets no such variable
    no_proxy_env.setenv(ENV_PROXY_CA, str(cert))
    proxy = Proxy(database, "--host", "0.0.0.0", "--token-file", str(token), "--tls-cert", str(cert),
                  "--tls-key", str(key))
    try:
        make_study(proxy.url, "tls-worker", 2)
        ((code, output),) = finish(start_workers(proxy.url, "tls-worker", 1), timeout=300)
        assert code == 0, output
        assert by_state(proxy.storage.get_all_trials(proxy.storage.get_study_id_from_name("tls-worker"))) == {
            "COMPLETE": 2}
    finally:
        out = proxy.stop()
    assert "TLS, token required" in out and "WARNING" not in out and proxylib.TOKEN not in out
