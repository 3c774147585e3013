"""Reports, exports and the dashboard on a real PostgreSQL storage (LORA_TUNE_TEST_POSTGRES_URL)."""
from __future__ import annotations

import uuid

import optuna
import pandas as pd
import pytest
import sqlalchemy as sa
import yaml
from click.testing import CliRunner

from lora_tune.cli.main import cli
from tests.report.dashboard_server import get_json, running_dashboard
from tests.report.lora_study_factory import make_lora_study

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.postgres
PASSWORD = "s3cret-not-shown"


@pytest.fixture(scope="module")
def pg(postgres_url):
    """A study in the session database; the URL carries a password (ignored under trust auth)."""
    url = sa.engine.make_url(postgres_url)
    if url.password is None:
        url = url.set(password=PASSWORD)
    url_text = url.render_as_string(hide_password=False)
    name = f"report-{uuid.uuid4().hex[:8]}"
    make_lora_study(url_text, name=name)
    return url_text, name, url.password


def run(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_report_and_exports_on_postgres(pg, tmp_path):
    url, name, password = pg
    code, out, err = run("report", name, "--storage", url, "-o", str(tmp_path / "r.html"))
    assert code == 0, err
    html = (tmp_path / "r.html").read_text()
    assert name in html and ":***@" in html and password not in html
    code, out, err = run("study", "export-trials", name, "--storage", url, "-o", str(tmp_path / "t.parquet"))
    assert code == 0, err
    assert len(pd.read_parquet(tmp_path / "t.parquet")) == 24
    code, out, err = run("export", name, "--storage", url, "-o", str(tmp_path / "best.yaml"))
    assert code == 0, err
    text = (tmp_path / "best.yaml").read_text()
    assert password not in text and password not in out + err
    assert yaml.safe_load(text)["provenance"]["storage"].startswith("postgresql")


def test_unknown_study_on_postgres_lists_studies(pg, tmp_path):
    url, name, password = pg
    code, out, err = run("report", "no-such-study", "--storage", url, "-o", str(tmp_path / "r.html"))
    assert code == 2 and name in err and password not in err


@pytest.mark.slow
def test_dashboard_on_postgres(pg):
    url, name, _ = pg
    with running_dashboard(url, "--no-save-figures") as base:
        names = [s["study_name"] for s in get_json(base + "/api/studies")["study_summaries"]]
        assert name in names
