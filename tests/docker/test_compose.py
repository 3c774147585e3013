"""The docker/ stack, checked without a Docker engine: parse the compose files and prove that
every command is a real `lora-tune` command line, that PostgreSQL has a volume and a
healthcheck, and that no secret is written inline."""
from __future__ import annotations

import getpass
import os
import re
from pathlib import Path

import click
import pytest
import yaml

from lora_tune.cli.main import cli
from lora_tune.study.storage.opening import mask_url, storage_kind
from lora_tune.study.storage.proxy_client import ENV_PROXY_TOKEN_FILE, read_token_file

DOCKER = Path(__file__).resolve().parents[2] / "docker"
REPO = DOCKER.parent
_VAR = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    values = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ rules, applied recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, op, arg = match.groups()
        if env.get(name):
            return env[name]
        if op == "?":
            raise AssertionError(f"{name} is required: {arg}")
        return arg if op == "-" else ""

    return _VAR.sub(one, value.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(yaml.safe_load((DOCKER / "compose.yaml").read_text()), env_example())


def test_services(compose):
    assert set(compose["services"]) == {"postgres", "proxy-token", "proxy", "create", "worker", "dashboard"}
    assert {"pgdata", "proxy-token"} <= set(compose["volumes"])


def test_postgres_has_volume_and_healthcheck(compose):
    pg = compose["services"]["postgres"]
    assert any(v.startswith("pgdata:") and v.endswith("/var/lib/postgresql/data") for v in pg["volumes"])
    check = pg["healthcheck"]
    assert "pg_isready" in " ".join(check["test"]) and check["retries"] >= 1
    # the variables in the healthcheck are the container's own ($$ escapes compose's $)
    assert "${POSTGRES_USER}" in " ".join(check["test"])


def _resolve(args: list[str]) -> tuple[click.Command, list[str]]:
    command: click.Command = cli
    rest = list(args)
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"`lora-tune {' '.join(args)}`: no command {rest[0]!r}"
        command, rest = sub, rest[1:]
    return command, rest


@pytest.mark.parametrize("service", ["proxy", "create", "worker", "dashboard"])
def test_every_command_is_a_real_lora_tune_command_line(compose, service):
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["lora-tune"]' in dockerfile
    args = compose["services"][service]["command"]
    assert isinstance(args, list) and args
    command, rest = _resolve(args)
    assert not isinstance(command, click.Group)
    # the files mounted at /studies are the repository's studies/
    rest = [str(REPO / "studies" / a[len("/studies/"):]) if a.startswith("/studies/") else a for a in rest]
    command.make_context(command.name, rest)  # raises on an unknown option or a missing argument


def test_study_file_and_name_agree(compose):
    env = env_example()
    study_file = REPO / "studies" / env["STUDY_FILE"]
    assert study_file.is_file()
    assert yaml.safe_load(study_file.read_text())["study"]["name"] == env["STUDY_NAME"]
    assert compose["services"]["worker"]["command"] == ["worker", env["STUDY_NAME"]]


def test_workers_wait_for_database_and_study(compose):
    worker = compose["services"]["worker"]
    assert worker["depends_on"]["proxy"]["condition"] == "service_healthy"
    assert compose["services"]["proxy"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert worker["depends_on"]["create"]["condition"] == "service_completed_successfully"
    assert worker["restart"] == "on-failure"
    assert int(worker["deploy"]["replicas"]) == int(env_example()["WORKERS"])
    assert compose["services"]["create"]["restart"] == "no"


def test_storage_url_comes_from_env_file(compose):
    env = env_example()
    for name in ("proxy", "create", "dashboard"):
        url = compose["services"][name]["environment"]["LORA_TUNE_STORAGE"]
        assert storage_kind(url) == "rdb" and "@postgres:5432/" in url
        assert env["POSTGRES_PASSWORD"] in url  # interpolated from .env, not written in compose.yaml
        assert env["POSTGRES_PASSWORD"] not in mask_url(url)


def test_workers_use_the_proxy_and_never_see_the_password(compose):
    env = env_example()
    worker, proxy = compose["services"]["worker"], compose["services"]["proxy"]
    assert worker["environment"] == {"LORA_TUNE_STORAGE": "grpc://proxy:13000",
                                     ENV_PROXY_TOKEN_FILE: "/run/lora-tune/proxy-token"}
    assert storage_kind(worker["environment"]["LORA_TUNE_STORAGE"]) == "grpc"
    assert env["POSTGRES_PASSWORD"] not in str(worker)
    args = proxy["command"]
    assert args[args.index("--port") + 1] == "13000" and args[args.index("--host") + 1] == "0.0.0.0"
    assert int(args[args.index("--max-connections") + 1]) == int(env["PROXY_CONNECTIONS"])
    assert "13000" in " ".join(proxy["healthcheck"]["test"])
    # the image installs the gRPC extra the proxy and its clients need
    assert "grpc" in re.search(r"ARG EXTRAS=(\S+)", (DOCKER / "Dockerfile").read_text())[1].split(",")


def test_no_secret_inline():
    raw = (DOCKER / "compose.yaml").read_text() + (DOCKER / "compose.gpu.yaml").read_text()
    for user, password in re.findall(r"://([^:@/\s]+):([^@\s]+)@", raw):
        assert password.startswith("${"), f"inline password for {user}"
    for key, value in re.findall(r"(?m)^\s*(\w*PASSWORD\w*):\s+(\S+)", raw):
        assert value.startswith("${"), f"{key} is written inline"
    assert "change-me" in env_example()["POSTGRES_PASSWORD"]  # the example holds no real secret
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_dashboard_only_on_localhost(compose):
    dashboard = compose["services"]["dashboard"]
    assert dashboard["ports"] == [f"127.0.0.1:{env_example()['DASHBOARD_PORT']}:8080"]
    args = dashboard["command"]
    assert args[args.index("--port") + 1] == "8080"


def test_gpu_override_builds_cuda_image():
    gpu = interpolate(yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text()), env_example())
    worker = gpu["services"]["worker"]
    command, rest = _resolve(worker["command"])
    command.make_context(command.name, list(rest))
    assert rest[rest.index("--jobs") + 1] == env_example()["GPUS_PER_WORKER"]
    assert "cu" in worker["build"]["args"]["TORCH_INDEX_URL"]
    assert "quant" in worker["build"]["args"]["EXTRAS"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert set(gpu["services"]) <= {"create", "worker", "dashboard"}
    assert "grpc" in worker["build"]["args"]["EXTRAS"]
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"ARG TORCH_INDEX_URL=\S+/cpu", dockerfile)


def test_dockerfile_copies_existing_paths_not_ignored():
    lines = (DOCKER / "Dockerfile").read_text().splitlines()
    ignored = [line.strip().lstrip("/") for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    sources = [src for line in lines if line.startswith("COPY ") for src in line.split()[1:-1]]
    assert {"pyproject.toml", "lora_tune", "studies"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        assert src not in ignored, f"COPY {src}: excluded by Dockerfile.dockerignore"
    assert "docker/.env" in ignored  # the real password never enters the image


def _mounts(service: dict) -> dict[str, str]:
    """``{container path: volume}`` of a service's named volumes (``:ro`` dropped)."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", []) if not v.startswith(".")}


def test_the_proxy_requires_a_token_only_the_workers_get(compose):
    services = compose["services"]
    proxy, worker = services["proxy"], services["worker"]
    args = proxy["command"]
    token_file = args[args.index("--token-file") + 1]
    folder = os.path.dirname(token_file)
    # the proxy and the workers mount the token's volume read-only; the workers name the same file
    assert worker["environment"][ENV_PROXY_TOKEN_FILE] == token_file
    for service in (proxy, worker):
        assert _mounts(service)[folder] == "proxy-token"
        assert f"proxy-token:{folder}:ro" in service["volumes"]
    # nobody else does: not the dashboard, not `study create`, not PostgreSQL
    for name in set(services) - {"proxy", "worker", "proxy-token"}:
        assert "proxy-token" not in _mounts(services[name]).values(), name
    # the token is made before the proxy starts, by a one-shot service that holds no database URL
    maker = services["proxy-token"]
    assert proxy["depends_on"]["proxy-token"]["condition"] == "service_completed_successfully"
    assert maker["restart"] == "no" and maker["environment"] == {} and not maker.get("ports")
    assert _mounts(maker)[folder] == "proxy-token" and token_file in maker["entrypoint"][-1]
    assert "ports" not in proxy  # reachable on the compose network only
    assert "--insecure" not in args


def test_the_token_maker_writes_a_private_random_token_once(tmp_path):
    """Run the proxy-token service's script here (its path and user changed to this test's)."""
    raw = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["proxy-token"]
    assert raw["entrypoint"][:2] == ["python", "-c"]
    target = tmp_path / "proxy-token"
    script = raw["entrypoint"][2].replace("/run/lora-tune/proxy-token", str(target))
    script = script.replace('getpwnam("lora")', f"getpwnam({getpass.getuser()!r})")
    exec(compile(script, "proxy-token", "exec"), {})
    token = read_token_file(str(target), "--token-file")  # what the proxy accepts
    assert len(token) >= 32 and target.stat().st_mode & 0o777 == 0o600
    exec(compile(script, "proxy-token", "exec"), {})
    assert read_token_file(str(target), "--token-file") == token  # kept across restarts
    target.write_text("\n")
    exec(compile(script, "proxy-token", "exec"), {})
    assert read_token_file(str(target), "--token-file") != token  # an empty file is replaced
