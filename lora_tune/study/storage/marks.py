"""What lora-tune records on a trial it starts (trial system attributes).

* ``lora_tune:worker`` - ``hostname:pid`` of the worker running the trial: a worker on the
  same machine whose process is gone is noticed at once;
* ``lora_tune:heartbeat`` - rewritten every ``study.heartbeat_interval`` seconds while the
  trial runs; a trial whose value stops changing for ``study.grace_period`` seconds is
  failed and its parameters re-queued (:mod:`lora_tune.study.storage.heartbeat`);
* ``lora_tune:start`` - a random token of the call that started the trial: when the database
  connection breaks after that call was applied but before its answer arrived, the retried
  call finds the trial it already started instead of starting a second one
  (:class:`lora_tune.study.storage.budget.BudgetedStorage`).
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
    """The system attributes of a trial being started by ``worker`` (None: by a proxy) in the
    call whose token is ``token``."""
    marks: dict[str, Any] = {HEARTBEAT_KEY: time.time(), START_KEY: token}
    if worker is not None:
        marks[WORKER_KEY] = worker
    return marks
