"""A tiny real LoRA study: a fixed pretrained-by-seed MLP, LoRA injected per trial, a few
Adam steps, evaluation loss as the metric, and ``save_best_adapter`` called like the
study driver does. Small enough to run in a few seconds on a CPU."""
from __future__ import annotations

import optuna
import torch
from torch import nn

import lora_tune
from lora_tune.study.trial.artifacts import save_best_adapter

N_IN, N_HIDDEN, N_OUT = 6, 16, 3


def build_base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N_IN, N_HIDDEN), nn.Tanh(), nn.Linear(N_HIDDEN, N_OUT))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, N_IN, generator=g)
    w = torch.randn(N_IN, N_OUT, generator=g)
    return x, torch.sin(x @ w)


def evaluate(model: nn.Module) -> float:
    x, y = data()
    model.eval()
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def objective(trial: optuna.Trial, storage_url: str | None = None) -> float:
    rank = trial.suggest_categorical("rank", [1, 2, 4])
    alpha_ratio = trial.suggest_categorical("alpha_ratio", [1.0, 2.0])
    targets = trial.suggest_categorical("targets", ["all-linear", "0"])
    lr = trial.suggest_float("learning_rate", 1e-3, 5e-2, log=True)
    model = build_base()
    config = lora_tune.LoraConfig(rank=rank, alpha=alpha_ratio * rank, targets=targets if targets != "0" else ["0"])
    report = lora_tune.inject(model, config)
    trial.set_user_attr("lora_config", config.to_dict())
    trial.set_user_attr("target_preset", targets if targets != "0" else None)
    trial.set_user_attr("target_modules", [name for name, _ in report.targets])
    trial.set_user_attr("trainable_params", int(report.trainable_after))
    torch.manual_seed(trial.number)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    x, y = data()
    for _ in range(15):
        model.train()
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    value = evaluate(model)
    trial.set_user_attr("metric_values", {"loss": value})
    save_best_adapter(trial, model, value, config=config, storage_url=storage_url)
    return value


def run_study(storage_url: str, name: str = "tiny", n_trials: int = 6) -> optuna.Study:
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared CPU
    study = optuna.create_study(study_name=name, storage=storage_url, direction="minimize",
                                sampler=optuna.samplers.RandomSampler(seed=3))
    study.set_user_attr("spec", {"study": {"name": name, "metric": "loss", "direction": "minimize"},
                                 "task": {"type": "python", "factory": "tests.export.tiny_lora_study:build_base"},
                                 "train": {"steps": 15, "optimizer": "adam"}})
    study.set_user_attr("metrics", ["loss"])
    study.optimize(lambda t: objective(t, storage_url), n_trials=n_trials)
    return study
