"""The storage layer, one concept per module; :mod:`.opening` assembles them (``open_storage``).

* :mod:`.urls` - storage URLs: kinds, journal paths, gRPC addresses, password masking;
* :mod:`.wrapper` - :class:`~.wrapper.StorageWrapper`, a storage forwarding every call to another;
* :mod:`.retry` - retrying transient connection errors with backoff;
* :mod:`.budget` - the study's exact global trial budget, counted as the trial record says;
* :mod:`.locks` - the per-study lock the budget is counted under;
* :mod:`.masking` - no password stored in a study attribute;
* :mod:`.marks` - the trial system attributes workers write (worker, heartbeat, start);
* :mod:`.heartbeat` - heartbeats and the stale-trial watch;
* :mod:`.proxy_server` / :mod:`.proxy_client` - ``lora-tune storage-proxy`` and its workers.

Each layer uses Optuna's public storage API only; Optuna's own storages do every write.
"""
