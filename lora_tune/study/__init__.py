"""Studies: the study file (``spec``), its search space (``space``), one trial
(``objective``), storages (``storage``), and creating/loading/optimizing (``runner``).

This is the only package that imports Optuna. Import the submodules directly, e.g.
``from lora_tune.study.runner import create_study, load_study, optimize``.
"""
