"""The Kubernetes and SLURM recipes (docker/kubernetes, docker/slurm), checked without a cluster:
parse them and prove that they run real `lora-tune` command lines, one GPU per worker, with
the storage URL (and its password) from a Secret or the environment, never written inline."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import yaml

from lora_tune.cli.main import cli

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
    storage = _env(container)["LORA_TUNE_STORAGE"]
    assert storage["valueFrom"]["secretKeyRef"] == {"name": "lora-tune-db", "key": "url"}
    assert _env(container)["LORA_TUNE_WORKER_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert pod["terminationGracePeriodSeconds"] >= 30


def test_proxy_deployment_and_service_agree():
    deployment, service = _documents("proxy.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command, ctx = _command(container["args"])
    assert command.name == "storage-proxy" and ctx.params["host"] == "0.0.0.0"
    port = ctx.params["port"]
    assert container["ports"][0]["containerPort"] == port == service["spec"]["ports"][0]["targetPort"]
    assert service["metadata"]["name"] == "lora-tune-proxy"
    assert f"grpc://lora-tune-proxy:{service['spec']['ports'][0]['port']}" in (DOCKER / "kubernetes" / "proxy.yaml").read_text()
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert _env(container)["LORA_TUNE_STORAGE"]["valueFrom"]["secretKeyRef"]["name"] == "lora-tune-db"


def _sbatch() -> tuple[dict[str, str], list[str]]:
    text = (DOCKER / "slurm" / "workers.sbatch").read_text()
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
    for path in [*(DOCKER / "kubernetes").glob("*.yaml"), DOCKER / "slurm" / "workers.sbatch"]:
        text = path.read_text()
        for user, password in re.findall(r"://([^:@/\s]+):([^@\s]+)@", text):
            assert password == "PASSWORD", f"{path.name}: a real-looking password for {user}"
        for doc in (yaml.safe_load_all(text) if path.suffix == ".yaml" else []):
            for container in (doc or {}).get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                assert all("value" not in e or "://" not in str(e["value"]) or "grpc://" in str(e["value"])
                           for e in container.get("env", []))


def test_the_recipes_are_documented():
    for path in ("docker/kubernetes/worker-job.yaml", "docker/kubernetes/proxy.yaml", "docker/slurm/workers.sbatch"):
        assert path in README, path
