"""Storage URLs: resolution order, kinds, journal paths, password masking, bad input."""
from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner

from lora_tune.cli.main import cli
from lora_tune.errors import ConfigError, StorageError
from lora_tune.study.storage import opening as st
from lora_tune.study.run.workers import check_parallel_storage


@pytest.mark.parametrize(
    "cli_value, env, spec, expected",
    [
        ("sqlite:///cli.db", "sqlite:///env.db", "sqlite:///spec.db", "sqlite:///cli.db"),
        (None, "sqlite:///env.db", "sqlite:///spec.db", "sqlite:///env.db"),
        (None, None, "sqlite:///spec.db", "sqlite:///spec.db"),
        (None, None, None, "sqlite:///lora_tune.db"),
        ("  ", "", None, "sqlite:///lora_tune.db"),  # blank values do not count
    ],
)
def test_resolve_storage_url_order(monkeypatch, cli_value, env, spec, expected):
    if env is None:
        monkeypatch.delenv(st.ENV_STORAGE, raising=False)
    else:
        monkeypatch.setenv(st.ENV_STORAGE, env)
    assert st.resolve_storage_url(cli_value, spec) == expected


@pytest.mark.parametrize(
    "url, kind, processes",
    [
        ("sqlite:///lora_tune.db", "sqlite", False),
        ("sqlite://", "memory", False),
        ("sqlite:///:memory:", "memory", False),
        ("postgresql+psycopg://u@h/db", "rdb", True),
        ("mysql+pymysql://u:p@h/db", "rdb", True),
        ("journal:./runs/study.log", "journal", True),
        ("runs/study.log", "journal", True),
        ("grpc://127.0.0.1:13000", "grpc", True),
        ("grpc://proxy.cluster.local:8080/", "grpc", True),
    ],
)
def test_storage_kind(url, kind, processes):
    assert st.storage_kind(url) == kind
    assert st.supports_processes(url) is processes


@pytest.mark.parametrize(
    "url, path",
    [("journal:study.log", "study.log"), ("journal:///abs/study.log", "/abs/study.log"),
     ("journal:runs/x.journal", "runs/x.journal"), ("x/y.log", "x/y.log")],
)
def test_journal_path(url, path):
    assert st.journal_path(url) == path


@pytest.mark.parametrize("url", ["grpc://proxy", "grpc://proxy:", "grpc://:13000", "grpc://h:99999",
                                 "grpc://u:pw@h:1", "grpc://h:x"])
def test_grpc_url_needs_host_and_port(url):
    with pytest.raises(ConfigError) as info:
        st.storage_kind(url)
    assert "grpc://HOST:PORT" in str(info.value) or "port from 1 to 65535" in str(info.value)
    assert "pw" not in str(info.value)


def test_grpc_address():
    from lora_tune.study.storage.urls import grpc_address

    assert grpc_address("grpc://10.0.0.5:13000") == ("10.0.0.5", 13000)
    assert grpc_address("grpc://[::1]:13000") == ("::1", 13000)


def test_unknown_scheme_names_what_is_allowed():
    with pytest.raises(ConfigError) as info:
        st.storage_kind("notadb://x/y")
    assert "notadb://x/y" in str(info.value) and "grpc://HOST:PORT" in str(info.value)
    assert st.storage_problem("notadb://x/y") and st.storage_problem("sqlite:///x.db") is None


def test_not_a_url_is_a_config_error():
    with pytest.raises(ConfigError, match="storage.*journal:PATH"):
        st.storage_kind("lora_tune.db")
    with pytest.raises(ConfigError, match="storage"):
        st.journal_path("journal:")


@pytest.mark.parametrize(
    "url, masked",
    [
        ("postgresql+psycopg://user:secret@host/db", "postgresql+psycopg://user:***@host/db"),
        ("postgresql://user:p%40ss/w@host:5432/db", "postgresql://user:***@host:5432/db"),
        ("postgresql+psycopg://user@host/db", "postgresql+psycopg://user@host/db"),
        ("mysql://u:x@h/db?password=y&ssl=1", "mysql://u:***@h/db?password=***&ssl=1"),
        ("sqlite:///lora_tune.db", "sqlite:///lora_tune.db"),
        ("journal:/tmp/a:b@c.log", "journal:/tmp/a:b@c.log"),
        # an unencoded '@' in the password: masked up to the last '@' before the host
        ("postgresql+psycopg://postgres:ssS3cr3t@x@host/db", "postgresql+psycopg://postgres:***@host/db"),
        ("postgresql://u:a@b/c@d@h:5432", "postgresql://u:***@h:5432"),
        ("grpc://proxy-host:13000", "grpc://proxy-host:13000"),
    ],
)
def test_mask_url(url, masked):
    assert st.mask_url(url) == masked


def test_mask_secrets_in_free_text():
    text = "could not connect to postgresql://admin:hunter2@db:5432/x (dsn host=db password=hunter2 user=a)"
    masked = st.mask_secrets(text)
    assert "hunter2" not in masked
    assert "postgresql://admin:***@db:5432/x" in masked and "password=***" in masked


def test_mask_secrets_password_with_at_sign_in_free_text():
    text = "cannot open storage postgresql+psycopg://postgres:ssS3cr3t@x@db:5432/x: timeout; also mysql://a:b@c@d/e"
    masked = st.mask_secrets(text)
    assert "ssS3cr3t" not in masked and "x@db" not in masked and "b@c" not in masked
    assert "postgres:***@db:5432/x: timeout" in masked and "mysql://a:***@d/e" in masked


def test_log_records_are_masked(caplog):
    logger = logging.getLogger("lora_tune.test_masking")
    logger.addFilter(st.MaskingFilter())
    with caplog.at_level(logging.INFO, logger="lora_tune.test_masking"):
        logger.info("opening %s", "postgresql://u:topsecret@h/db")
    assert "topsecret" not in caplog.text and "u:***@h" in caplog.text


def test_unreachable_server_error_hides_password():
    with pytest.raises(StorageError) as info:
        st.open_storage("postgresql+psycopg://someone:hunter2@127.0.0.1:1/nowhere", retry_seconds=0)
    assert "hunter2" not in str(info.value)
    assert "someone:***@127.0.0.1:1/nowhere" in str(info.value)


def test_heartbeat_settings_come_from_the_stored_study_file():
    from lora_tune.study.storage.heartbeat import HeartbeatSettings

    assert HeartbeatSettings.from_study({}) == HeartbeatSettings(30, None, 2)
    assert HeartbeatSettings.from_study({}).grace == 90
    stored = {"spec": {"study": {"heartbeat_interval": 5, "failed_trial_retries": 0}}}
    settings = HeartbeatSettings.from_study(stored)
    assert (settings.interval, settings.grace, settings.failed_trial_retries) == (5, 15, 0)
    stored["spec"]["study"]["grace_period"] = 7
    assert HeartbeatSettings.from_study(stored).grace == 7


def test_dispose_twice_is_fine(tmp_path):
    storage = st.open_storage(f"sqlite:///{tmp_path / 'x.db'}")
    st.dispose_storage(storage)
    st.dispose_storage(storage)
    assert storage.get_all_studies() == []  # connections reopen on demand


def test_parallel_sqlite_refused_with_reason():
    check_parallel_storage("sqlite:///x.db", 1)
    check_parallel_storage("journal:x.log", 8)
    check_parallel_storage("postgresql+psycopg://u@h/db", 8)
    with pytest.raises(ConfigError) as info:
        check_parallel_storage("sqlite:///x.db", 2)
    assert info.value.field == "--jobs"
    assert "journal:" in str(info.value) and "database is locked" in str(info.value)
    with pytest.raises(ConfigError):
        check_parallel_storage("journal:x.log", 0)


def test_worker_cli_unknown_study_lists_studies(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    import optuna

    storage = st.open_storage(url)
    optuna.create_study(study_name="present", storage=storage)
    st.dispose_storage(storage)
    result = CliRunner().invoke(cli, ["worker", "absent", "--storage", url, "--objective", "math:sqrt"])
    assert result.exit_code == 2
    assert "absent" in result.output and "present" in result.output


def test_worker_cli_bad_objective_path(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    import optuna

    storage = st.open_storage(url)
    optuna.create_study(study_name="s", storage=storage)
    st.dispose_storage(storage)
    for bad in ("nocolon", "no_such_module_xyz:f", "math:no_such_function"):
        result = CliRunner().invoke(cli, ["worker", "s", "--storage", url, "--objective", bad])
        assert result.exit_code == 2, result.output
        assert "--objective" in result.output


def test_worker_cli_masks_password_of_unreachable_server():
    result = CliRunner().invoke(
        cli, ["worker", "s", "--storage", "postgresql+psycopg://bob:hunter2@127.0.0.1:1/db", "--objective", "m:f"]
    )
    assert result.exit_code == 1
    assert "hunter2" not in result.output and "bob:***@127.0.0.1:1/db" in result.output


def test_study_attributes_never_store_a_password(tmp_path):
    import optuna

    storage = st.open_storage(f"sqlite:///{tmp_path / 'attrs.db'}")
    study = optuna.create_study(study_name="attrs", storage=storage)
    spec = {"study": {"storage": "postgresql+psycopg://bob:hunter2@db/lt", "n_trials": 3},
            "notes": ["see mysql://x:y@h/d", 5]}
    study.set_user_attr("spec", spec)
    stored = optuna.load_study(study_name="attrs", storage=optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'attrs.db'}")).user_attrs["spec"]
    assert stored == {"study": {"storage": "postgresql+psycopg://bob:***@db/lt", "n_trials": 3},
                      "notes": ["see mysql://x:***@h/d", 5]}
    st.dispose_storage(storage)
