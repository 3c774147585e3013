"""Studies: the only package that imports Optuna, one folder per layer.

* ``schema/`` - the study file: its schema (``spec``), search space (``space``, ``space_keys``),
  bounded YAML reading, model templates and target coverage;
* ``trial/`` - one trial: the trial record (``record``), the objective, nested-rank scoring,
  the trial process, confirmation runs and adapter artifacts;
* ``run/`` - creating, loading and optimizing studies (``runner``), the worker loop, samplers,
  warm start and progress;
* ``storage/`` - storage URLs and the layers over Optuna's storages, heartbeats and the
  storage proxy (server and client);
* ``integrations/`` - pruning callbacks for Hugging Face ``Trainer`` and Lightning.

Imports flow ``schema -> trial -> run``, with ``storage`` beside them. Import the submodules
directly, e.g. ``from lora_tune.study.run.runner import create_study, load_study, optimize``.
"""
