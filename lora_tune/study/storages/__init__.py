"""The storage layer, one concept per module (``lora_tune.study.storage`` assembles them).

* :mod:`.urls` - storage URLs: kinds, journal paths, gRPC addresses, password masking;
* :mod:`.wrapper` - :class:`~.wrapper.StorageWrapper`, a storage forwarding every call to another;
* :mod:`.retry` - retrying transient connection errors with backoff;
* :mod:`.budget` - the study's exact global trial budget (and the one way it is counted);
* :mod:`.locks` - the per-study lock the budget is counted under;
* :mod:`.masking` - no password stored in a study attribute;
* :mod:`.grpc` - workers talking to ``lora-tune storage-proxy`` (Optuna's gRPC proxy).

Each layer uses Optuna's public storage API only; Optuna's own storages do every write.
"""
