"""Your own Optuna objective over a lora-tune search space.

Run: python examples/own_objective.py            (lora-tune's injector, ~10 s on a 2-core CPU)
     python examples/own_objective.py --peft     (the same trials trained through PEFT)

The search space comes from a study file (``own_objective.yaml``); ``space.suggest(trial)``
gives each trial's ``lora_tune.LoraConfig`` and ``space.suggest_training(trial)`` its training
settings, under the trial parameter names lora-tune's own studies use -- so this objective and
``lora-tune run`` can share one study in one storage. The model is a tiny Llama built from a
config (random weights, nothing downloaded); the data are number sequences counting up by a
fixed step, modulo the vocabulary, which a LoRA adapter learns to continue within a few steps.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import optuna
import torch
import transformers

import lora_tune

VOCAB, LENGTH, STEPS, EVAL_EVERY = 64, 16, 30, 10
space = lora_tune.SearchSpace.from_file(Path(__file__).with_name("own_objective.yaml"))


def tiny_llama() -> torch.nn.Module:
    """The same base model for every trial (seeded)."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config)


def sequences(n: int, seed: int) -> torch.Tensor:
    """``n`` rows of (start + step * t) mod VOCAB."""
    g = torch.Generator().manual_seed(seed)
    start, step = torch.randint(0, VOCAB, (n, 1), generator=g), torch.randint(1, 6, (n, 1), generator=g)
    return (start + step * torch.arange(LENGTH)) % VOCAB


TRAIN, EVAL = sequences(512, seed=1), sequences(64, seed=2)


def eval_loss(model: torch.nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=EVAL, labels=EVAL).loss.item()
    model.train()
    return loss


def objective(trial: optuna.Trial, use_peft: bool) -> float:
    config = space.suggest(trial)                 # a lora_tune.LoraConfig
    train = space.suggest_training(trial)         # {"learning_rate": ...}
    model = tiny_llama()
    if use_peft:
        import peft

        model = peft.get_peft_model(model, config.to_peft(model))
    else:
        lora_tune.inject(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trial.set_user_attr("trainable_params", sum(p.numel() for p in trainable))
    optimizer = torch.optim.AdamW(trainable, lr=train["learning_rate"])
    order = torch.randperm(len(TRAIN), generator=torch.Generator().manual_seed(trial.number))
    model.train()
    for step in range(STEPS):
        batch = TRAIN[order[step * 16:(step + 1) * 16]]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % EVAL_EVERY == 0:
            trial.report(eval_loss(model), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
    return eval_loss(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peft", action="store_true", help="train through peft.get_peft_model(config.to_peft(model))")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--storage", default=None, help="an Optuna storage URL (default: in memory)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models train fastest on one thread
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="own-objective", storage=args.storage, load_if_exists=True,
                                direction="minimize", sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3))
    print(f"base model eval_loss {eval_loss(tiny_llama()):.3f}")
    study.optimize(lambda trial: objective(trial, args.peft), n_trials=args.trials)
    for t in study.trials:
        value = f"{t.value:.3f}" if t.value is not None else t.state.name.lower()
        print(f"trial {t.number}: eval_loss {value}  {t.params}")
    best = study.best_trial
    print(f"best trial #{best.number}: eval_loss {best.value:.3f} with {space.suggest(best)}")


if __name__ == "__main__":
    main()
