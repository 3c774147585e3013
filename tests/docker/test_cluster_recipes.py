"""The Kubernetes and SLURM recipes (docker/kubernetes, docker/slurm), checked without a cluster:
parse them and prove that they run real `lora-tune` command lines, one GPU per worker, with
the storage URL (and its password) from a Secret or the environment, never written inline,
and that the storage proxy requires a token that only the workers are given."""
from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import click
import yaml

from lora_tune.cli.main import cli
from lora_tune.study.storage.proxy_client import ENV_PROXY_TOKEN, ENV_PROXY_TOKEN_FILE, read_token_file

DOCKER = Path(__file__).resolve().parents[2] / "docker"
README = (DOCKER.parent / "README.md").read_text()


def _command(args: list[str]) -> tuple[click.Command, click.Context]:
    command: click.Command = cli
    rest = list(args)
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"`lora-tune {' '.join(args)}`: no command {rest[0]!r}"
        command, rest = sub, rest[1:]
    assert not isinstance(command, click.Group), args
    return command, command.make_context(command.name, rest)  # raises on unknown options


def _documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DOCKER / "kubernetes" / name).read_text()) if d]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_worker_job_runs_n_workers_one_gpu_each():
    (job,) = _documents("worker-job.yaml")
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    spec = job["spec"]
    assert spec["parallelism"] >= 2 and "completions" not in spec  # a work-queue Job
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    (container,) = pod["containers"]
    command, ctx = _command(container["args"])  # the image's ENTRYPOINT is lora-tune
    assert command.name == "worker" and ctx.params["name"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # through the proxy's Service, with the proxy's token from its Secret; no database password
    assert _env(container)["LORA_TUNE_STORAGE"] == {"name": "LORA_TUNE_STORAGE", "value": "grpc://lora-tune-proxy:13000"}
    token = _env(container)[ENV_PROXY_TOKEN]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "lora-tune-proxy-token", "key": "token"}
    assert "lora-tune-db" not in str(job)
    assert _env(container)["LORA_TUNE_WORKER_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert pod["terminationGracePeriodSeconds"] >= 30


def test_proxy_deployment_and_service_agree():
    deployment, service, _ = _documents("proxy.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command, ctx = _command(container["args"])
    assert command.name == "storage-proxy" and ctx.params["host"] == "0.0.0.0"
    assert ctx.params["token_file"] and not ctx.params["insecure"]
    port = ctx.params["port"]
    assert container["ports"][0]["containerPort"] == port == service["spec"]["ports"][0]["targetPort"]
    assert service["metadata"]["name"] == "lora-tune-proxy"
    (job,) = _documents("worker-job.yaml")
    (worker,) = job["spec"]["template"]["spec"]["containers"]
    assert _env(worker)["LORA_TUNE_STORAGE"]["value"] == f"grpc://lora-tune-proxy:{service['spec']['ports'][0]['port']}"
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert _env(container)["LORA_TUNE_STORAGE"]["valueFrom"]["secretKeyRef"]["name"] == "lora-tune-db"


def _sbatch(name: str = "workers.sbatch") -> tuple[dict[str, str], list[str]]:
    text = (DOCKER / "slurm" / name).read_text()
    assert text.startswith("#!/bin/bash\n")
    options = {}
    for key, value in re.findall(r"(?m)^#SBATCH\s+--([\w-]+)(?:=(\S+))?", text):
        options[key] = value
    body = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return options, body


def test_slurm_array_runs_one_worker_per_task_with_one_gpu():
    options, body = _sbatch()
    assert re.fullmatch(r"0-\d+(%\d+)?", options["array"])
    assert options["gres"] == "gpu:1"
    assert options["signal"].startswith("TERM@")  # the trial is re-queued before the time limit
    (launch,) = [line for line in body if line.startswith("srun ")]
    words = shlex.split(launch)
    assert words[:2] == ["srun", "lora-tune"]
    command, ctx = _command([w.replace('"${STUDY_NAME}"', "x").replace("${STUDY_NAME}", "x") for w in words[2:]])
    assert command.name == "worker"
    assert any("LORA_TUNE_STORAGE:?" in line for line in body)  # refuses to start without a storage


def test_no_secret_inline_in_the_recipes():
    for path in [*(DOCKER / "kubernetes").glob("*.yaml"), *(DOCKER / "slurm").glob("*.sbatch")]:
        text = path.read_text()
        for user, password in re.findall(r"://([^:@/\s]+):([^@\s]+)@", text):
            assert password == "PASSWORD", f"{path.name}: a real-looking password for {user}"
        for doc in (yaml.safe_load_all(text) if path.suffix == ".yaml" else []):
            for container in (doc or {}).get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                assert all("value" not in e or "://" not in str(e["value"]) or "grpc://" in str(e["value"])
                           for e in container.get("env", []))


def test_the_recipes_are_documented():
    for path in ("docker/kubernetes/worker-job.yaml", "docker/kubernetes/proxy.yaml", "docker/slurm/workers.sbatch",
                 "docker/slurm/proxy.sbatch"):
        assert path in README, path


def test_proxy_token_comes_from_a_secret_mounted_as_a_private_file():
    deployment, _, _ = _documents("proxy.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    _, ctx = _command(container["args"])
    folder, name = os.path.split(ctx.params["token_file"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "lora-tune-proxy-token"
    assert name == "token"  # the Secret's key is the file's name
    mode = volume["secret"]["defaultMode"]
    assert not mode & stat.S_IROTH and mode & stat.S_IRGRP  # the proxy refuses a world-readable file
    # ... readable by the container's user through its group
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] == 10001
    assert "lora-tune-proxy-token" not in str(container.get("env"))  # a file, not an environment variable


def test_only_worker_pods_may_reach_the_proxy():
    deployment, service, policy = _documents("proxy.yaml")
    (job,) = _documents("worker-job.yaml")
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}  # pods of this namespace with the label, nothing else
    assert source["podSelector"]["matchLabels"] == job["spec"]["template"]["metadata"]["labels"]
    (port,) = rule["ports"]
    assert port == {"protocol": "TCP", "port": service["spec"]["ports"][0]["targetPort"]}


def test_secrets_are_created_without_a_secret_on_the_command_line():
    text = (DOCKER / "kubernetes" / "proxy.yaml").read_text()
    assert "kubectl create secret generic lora-tune-proxy-token --from-file=token=/dev/stdin" in text
    assert "kubectl create secret generic lora-tune-db --from-file=url=/dev/stdin" in text
    for path in [*(DOCKER / "kubernetes").glob("*.yaml"), DOCKER / "README.md", DOCKER.parent / "README.md"]:
        assert "--from-literal" not in path.read_text(), path.name


def _fake_cluster(tmp_path: Path) -> dict[str, str]:
    """PATH with an `srun` that records its arguments and the token variables, and a HOME."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    home.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$HOME/srun-args"\n'
                    f'echo "${{{ENV_PROXY_TOKEN_FILE}:-}}" > "$HOME/srun-token-file"\n')
    srun.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(home), "STUDY_NAME": "s"}


def test_slurm_proxy_makes_a_private_token_once_and_requires_it(tmp_path):
    options, body = _sbatch("proxy.sbatch")
    assert "gres" not in options and "time" in options
    (launch,) = [line for line in body if line.startswith("srun ")]
    words = shlex.split(launch)
    assert words[:2] == ["srun", "lora-tune"]
    env = _fake_cluster(tmp_path)
    env["LORA_TUNE_STORAGE"] = "postgresql+psycopg://lora@db-host:5432/lora_tune"
    script = DOCKER / "slurm" / "proxy.sbatch"
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True, text=True)
    args = (tmp_path / "home" / "srun-args").read_text().splitlines()
    command, ctx = _command(args[1:])
    assert command.name == "storage-proxy" and ctx.params["host"] == "0.0.0.0" and not ctx.params["insecure"]
    token_file = Path(ctx.params["token_file"])
    assert token_file == tmp_path / "home" / ".config" / "lora-tune" / "proxy-token"
    token = read_token_file(str(token_file), "--token-file")  # what the proxy accepts: private, long
    assert token_file.stat().st_mode & 0o777 == 0o600 and len(token) >= 32
    assert (token_file.parent / "proxy-url").read_text().strip().endswith(":13000")
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    assert read_token_file(str(token_file), "--token-file") == token  # made once, kept
    # TLS when asked for
    env.update(PROXY_TLS_CERT="/etc/proxy.pem", PROXY_TLS_KEY="/etc/proxy-key.pem")
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    _, ctx = _command((tmp_path / "home" / "srun-args").read_text().splitlines()[1:])
    assert (ctx.params["tls_cert"], ctx.params["tls_key"]) == ("/etc/proxy.pem", "/etc/proxy-key.pem")


def test_slurm_workers_send_the_proxy_token(tmp_path):
    env = _fake_cluster(tmp_path)
    env["LORA_TUNE_STORAGE"] = "grpc://node7:13000"
    script = DOCKER / "slurm" / "workers.sbatch"
    missing = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "proxy.sbatch" in missing.stderr  # no token: refuses to start
    token_file = tmp_path / "home" / ".config" / "lora-tune" / "proxy-token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text("x" * 43 + "\n")
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    assert (tmp_path / "home" / "srun-token-file").read_text().strip() == str(token_file)
    # a database URL needs no token
    env["LORA_TUNE_STORAGE"] = "postgresql+psycopg://lora@db-host:5432/lora_tune"
    token_file.unlink()
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    assert (tmp_path / "home" / "srun-token-file").read_text().strip() == ""
