"""What lora-tune records on a trial it starts (trial system attributes).

``lora_tune:worker`` (``hostname:pid``: a dead process on the same machine is noticed at once),
``lora_tune:heartbeat`` (:mod:`.heartbeat`) and ``lora_tune:start`` (the token of the starting
call, so that a retried start finds its trial: :mod:`.budget`).
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any

WORKER_KEY = "lora_tune:worker"
HEARTBEAT_KEY = "lora_tune:heartbeat"
START_KEY = "lora_tune:start"
RETRY_KEY = "failed_trial"  # set by Optuna's RetryHeartbeatStaleTrialCallback on a retry


def worker_id() -> str:
    """``hostname:pid`` of this process, as recorded on the trials it runs.

    ``$LORA_TUNE_WORKER_HOST`` replaces the host name (e.g. a pod name that is not the
    container's host name); only workers of the same host judge each other's pids.
    """
    return f"{os.environ.get('LORA_TUNE_WORKER_HOST') or socket.gethostname()}:{os.getpid()}"


def start_marks(worker: str | None, token: str) -> dict[str, Any]:
    """The system attributes of a trial started by ``worker`` (None: by a proxy) in call ``token``."""
    marks: dict[str, Any] = {HEARTBEAT_KEY: time.time(), START_KEY: token}
    if worker is not None:
        marks[WORKER_KEY] = worker
    return marks
