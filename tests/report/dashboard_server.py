"""Run `lora-tune dashboard` as a real subprocess on a free local port (for tests)."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (local test server)
        return json.loads(resp.read())


@contextlib.contextmanager
def running_dashboard(storage_url: str, *extra: str, timeout: float = 60.0) -> Iterator[str]:
    """Yield the base URL of a dashboard started by the CLI; stop it afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "lora_tune.cli.main", "dashboard", "--storage", storage_url,
           "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise RuntimeError(f"dashboard exited with {proc.returncode}:\n{out}\n{err}")
            try:
                get_json(base + "/api/meta", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
