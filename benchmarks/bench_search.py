"""Search that costs less and can be trusted: three ways to tune LoRA on MiniLM, side by side.

On TREC and Subj (``../shared/data``), with one fixed small per-trial budget and the same seeds:

* **(a) anchor** - plain Optuna (TPE + median pruner) over PEFT configs, the study a user
  would write by hand: ``transformers`` + ``peft`` + a plain PyTorch loop, no lora-tune;
* **(b) lora-tune, previous defaults** - ``lora-tune run`` on a study file as the README
  wrote them before nested ranks: TPE, median pruner, a baseline trial, ``rank: {choices}``;
* **(c) lora-tune, cheaper search** - the same study with ``rank: {nested: [...]}``, Hyperband
  on training steps with ``fidelity.min_steps``, and ``warm_start: defaults``;
* **(d) lora-tune init** - the study ``lora-tune init minilm`` writes (its space, sampler, pruner,
  learning-rate probe, warm start and confirmation), on the same data and per-trial budget;
* **(r) random search** - plain Optuna ``RandomSampler`` over PEFT configs (the anchor's loop),
  given the search compute (d) used (or (c)'s, else ``--trials``): "random at equal compute";
* **(t), (g), (m), (n) variants of (d)** - its study with Optuna's TPE or ``GPSampler`` (one of
  them is (d) itself: init writes GPSampler, chosen this way), the median pruner instead of
  Hyperband, nested ranks instead of plain choices: the alternatives a default is chosen among.
  They run on the tuned pair only (the script refuses them on CR/MPQA).

TREC and Subj are the tuned pair (defaults may be chosen on them); CR and MPQA are held out
(``../shared/data/README.md``): never used to choose a default, reported apart.

Every arm searches the same space (rank, alpha ratio, targets, learning rate) for the same
number of trials, then re-runs its 3 best distinct configs with 2 more seeds (``study.confirm``
in lora-tune; the same loop for the anchor). Reported per arm: the best search value, the
confirmed best (mean ± std over 3 seeds of the config with the best mean), the compute of the
search in full-trial equivalents (a trial that trained all its planned steps is 1; a pruned one
its share; a nested-rank result 0, its training is its parent's), the compute until the search
first reached the anchor's final best, and wall time.

    python benchmarks/bench_search.py                      # all four data sets, several hours on 2 cores
    python benchmarks/bench_search.py --datasets trec --trials 6   # a quick look
    python benchmarks/bench_search.py --datasets trec subj --arms t m n --json run.json  # add arms to a run

Dev sets are carved from the training files (seeded), so no arm is tuned on a test set.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
RANKS = [4, 8, 16]
ALPHA_RATIOS = [1, 2, 4]
TARGETS = ["attention-qv", "attention", "all-linear"]
LR = (1e-4, 5e-3)
CONFIRM_TOP, CONFIRM_SEEDS = 3, 2
# the anchor's PEFT target_modules for lora-tune's presets on a BERT-style encoder
PEFT_TARGETS = {"attention-qv": ["query", "value"], "attention": ["query", "key", "value", "attention.output.dense"],
                "all-linear": "all-linear"}


def split_data(name: str, out: Path, train_examples: int, dev_examples: int, seed: int = 0) -> tuple[Path, Path]:
    """A seeded train/dev split of ``{name}_train.csv``: ``train_examples`` rows to train on,
    ``dev_examples`` held out (the test file is never looked at)."""
    with open(DATA / f"{name}_train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    random.Random(seed).shuffle(rows)
    parts = {"dev": rows[:dev_examples], "train": rows[dev_examples:dev_examples + train_examples]}
    paths = {}
    for part, chosen in parts.items():
        paths[part] = out / f"{name}_{part}.csv"
        with open(paths[part], "w", newline="") as f:
            writer = csv.DictWriter(f, ["text", "label"])
            writer.writeheader()
            writer.writerows({"text": r["text"], "label": r["label"]} for r in chosen)
    return paths["train"], paths["dev"]


# --- (a) the anchor: plain Optuna over PEFT -------------------------------------------------------

class Anchor:
    """The objective a user writes with transformers + peft: one trial trains one PEFT config."""

    def __init__(self, train: Path, dev: Path, args: argparse.Namespace):
        import torch
        import transformers

        from lora_tune.tasks.hf import resolve_model_ref

        self.args, self.path = args, resolve_model_ref("minilm")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path)
        self.train_rows, self.dev_rows = _rows(train), _rows(dev)
        self.labels = sorted({label for _, label in self.train_rows})
        self.steps = math.ceil(len(self.train_rows) / args.batch_size) * args.epochs
        self.eval_every = max(1, self.steps // args.evals)
        torch.set_num_threads(args.threads)
        transformers.logging.set_verbosity_error()

    def batches(self, rows: list[tuple[str, int]]) -> Any:
        for i in range(0, len(rows), self.args.batch_size):
            chunk = rows[i:i + self.args.batch_size]
            enc = self.tokenizer([t for t, _ in chunk], truncation=True, max_length=self.args.max_length,
                                 padding=True, return_tensors="pt")
            import torch

            yield enc, torch.tensor([self.labels.index(y) for _, y in chunk])

    def __call__(self, trial: optuna.trial.BaseTrial) -> float:
        import peft
        import torch
        import transformers

        rank = trial.suggest_categorical("rank", RANKS)
        ratio = trial.suggest_categorical("alpha_ratio", ALPHA_RATIOS)
        targets = trial.suggest_categorical("targets", TARGETS)
        lr = trial.suggest_float("learning_rate", *LR, log=True)
        seed = int(trial.user_attrs.get("seed", 0))
        torch.manual_seed(seed)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            self.path, num_labels=len(self.labels))
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=rank, lora_alpha=ratio * rank, lora_dropout=0.1, target_modules=PEFT_TARGETS[targets],
            task_type=peft.TaskType.SEQ_CLS))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        step, value = 0, 0.0
        for epoch in range(self.args.epochs):
            rows = list(self.train_rows)
            random.Random(seed * 1000 + epoch).shuffle(rows)
            for enc, y in self.batches(rows):
                model.train()
                loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
                step += 1
                if step % self.eval_every == 0 or step == self.steps:
                    value = self.evaluate(model)
                    trial.set_user_attr("train_steps", step)
                    trial.report(value, step)
                    if trial.should_prune():
                        raise optuna.TrialPruned()
        return value

    def evaluate(self, model: Any) -> float:
        import torch

        model.eval()
        right = 0
        with torch.no_grad():
            for enc, y in self.batches(self.dev_rows):
                right += int((model(**enc).logits.argmax(-1) == y).sum())
        return right / len(self.dev_rows)


def _rows(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        return [(r["text"], int(r["label"])) for r in csv.DictReader(f)]


def run_anchor(train: Path, dev: Path, args: argparse.Namespace, random_trials: int | None = None) -> dict[str, Any]:
    """(a): TPE + median pruner; with ``random_trials``, (r): that many random-search trials, unpruned."""
    objective = Anchor(train, dev, args)
    if random_trials is None:
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=args.seed),
                                    pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1))
    else:
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=args.seed),
                                    pruner=optuna.pruners.NopPruner())
    start = time.perf_counter()
    study.optimize(objective, n_trials=random_trials or args.trials)
    search_seconds = time.perf_counter() - start
    results = [(_anchor_share(t, objective.steps), t.value if t.state.name == "COMPLETE" else None)
               for t in study.trials]
    # confirm: the 3 best distinct configs, 2 more seeds each, as lora-tune's study.confirm does
    complete = sorted((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.value, reverse=True)
    chosen: list[optuna.trial.FrozenTrial] = []
    for t in complete:
        if all(t.params != c.params for c in chosen):
            chosen.append(t)
    groups = []
    for t in chosen[:CONFIRM_TOP]:
        values = [t.value]
        for k in range(1, CONFIRM_SEEDS + 1):
            fixed = optuna.trial.FixedTrial(dict(t.params))
            fixed.set_user_attr("seed", args.seed + 1000 * k)
            values.append(objective(fixed))
        groups.append(values)
    return _summary(results, groups, search_seconds, time.perf_counter() - start - search_seconds,
                    len(chosen[:CONFIRM_TOP]) * CONFIRM_SEEDS)


def _anchor_share(trial: optuna.trial.FrozenTrial, planned: int) -> float:
    return min(1.0, trial.user_attrs.get("train_steps", 0) / planned)


# --- (b), (c): lora-tune study files ---------------------------------------------------------------

def init_study_file(name: str, train: Path, dev: Path, args: argparse.Namespace) -> dict[str, Any]:
    """(d): what ``lora-tune init minilm`` writes, with this benchmark's data and per-trial budget."""
    from lora_tune.study.schema.templates import study_template

    template = study_template("minilm", train_file=str(train), eval_file=str(dev), name=f"{name}-d",
                              n_trials=args.trials)
    template["study"]["sampler"]["seed"] = args.seed
    template["task"].update({"max_length": args.max_length, "seed": args.seed})
    template["train"].update({"epochs": args.epochs, "batch_size": args.batch_size, "evals_per_epoch": args.evals,
                              "seed": args.seed, "device": "cpu", "threads": args.threads})
    return template


VARIANTS = {  # (d) with one choice changed: what the defaults are picked among, on the tuned pair
    "t": ("sampler", {"type": "tpe", "seed": None, "options": {"n_startup_trials": 6}}),
    "g": ("sampler", {"type": "gp", "seed": None, "options": {"n_startup_trials": 6}}),
    "m": ("pruner", {"type": "median", "options": {"n_startup_trials": 5, "n_warmup_steps": 1}}),
    "n": ("rank", None),  # the init space's ranks, nested
}


def study_file(arm: str, name: str, train: Path, dev: Path, args: argparse.Namespace) -> dict[str, Any]:
    if arm == "d" or arm in VARIANTS:
        raw = init_study_file(name, train, dev, args)
        if arm in VARIANTS:
            key, value = VARIANTS[arm]
            raw["study"]["name"] = f"{name}-{arm}"
            if key == "rank":
                raw["search_space"]["rank"] = {"nested": raw["search_space"]["rank"]["choices"]}
            else:
                raw["study"][key] = {**value, **({"seed": args.seed} if "seed" in value else {})}
        return raw
    cheaper = arm == "c"
    study: dict[str, Any] = {
        "name": f"{name}-{arm}", "direction": "maximize", "metric": "accuracy",
        "sampler": {"type": "tpe", "seed": args.seed},
        "pruner": ({"type": "hyperband", "options": {"min_resource": 1, "reduction_factor": 3}} if cheaper
                   else {"type": "median", "options": {"n_startup_trials": 5, "n_warmup_steps": 1}}),
        "n_trials": args.trials, "baseline": not cheaper,
        "confirm": {"top": CONFIRM_TOP, "seeds": CONFIRM_SEEDS},
    }
    if cheaper:
        study["warm_start"] = "defaults"
        study["fidelity"] = {"min_steps": args.min_steps, "data_fraction": args.data_fraction}
    return {
        "study": study,
        "task": {"type": "text-classification", "model": "minilm", "train_file": str(train), "eval_file": str(dev),
                 "max_length": args.max_length, "seed": args.seed},
        "search_space": {
            "rank": {"nested": RANKS} if cheaper else {"choices": RANKS},
            "alpha": {"ratio": ALPHA_RATIOS},
            "targets": {"choices": TARGETS},
            "dropout": 0.1,
            "learning_rate": {"type": "float", "low": LR[0], "high": LR[1], "log": True},
        },
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": 5e-4,
                  "evals_per_epoch": args.evals, "seed": args.seed, "device": "cpu", "threads": args.threads},
    }


def run_study(raw: dict[str, Any], work: Path) -> tuple[optuna.Study, float]:
    """``lora-tune run`` the study file ``raw`` in ``work`` (a new SQLite study named as the file
    says); the study and the run's wall seconds. Its last line of output is printed."""
    import yaml

    name = raw["study"]["name"]
    path, db = work / f"{name}.yaml", work / f"{name}.db"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    db.unlink(missing_ok=True)  # a kept folder's earlier study would be resumed
    storage = f"sqlite:///{db}"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lora_tune.cli.main", "run", str(path), "--storage", storage],
                          cwd=work, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"lora-tune run {path} failed:\n{done.stdout}\n{done.stderr}")
    print(done.stdout.strip().splitlines()[-1], flush=True)
    return optuna.load_study(study_name=name, storage=storage), seconds


def run_lora_tune(arm: str, name: str, train: Path, dev: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from lora_tune.study.trial import record

    study, seconds = run_study(study_file(arm, name, train, dev, args), work)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    confirms = [t for t in trials if record.kind_of(t) == record.Kind.CONFIRMATION]
    # the learning-rate probe (arm d) trains before the first trial: its compute comes first
    probe = record.probe_compute(study.user_attrs)
    results = [(probe, None)] if probe else []
    results += [(record.trial_compute(t), t.value if t.state.name == "COMPLETE" else None)
                for t in trials if record.kind_of(t) != record.Kind.CONFIRMATION]
    runs: dict[int, list[float]] = {}
    for t in confirms:
        if t.value is not None:
            runs.setdefault(int(t.user_attrs[record.CONFIRM_OF]), []).append(float(t.value))
    groups = [[next(t.value for t in trials if t.number == n), *values] for n, values in runs.items()]
    confirm_seconds = sum(record.timings_of(t).train_seconds or 0.0 for t in confirms)
    return _summary(results, groups, seconds - confirm_seconds, confirm_seconds, sum(map(len, runs.values())))


# --- the table ----------------------------------------------------------------------------------------

def _summary(results: list[tuple[float, float | None]], groups: list[list[float]], search_seconds: float,
             confirm_seconds: float, confirm_runs: int) -> dict[str, Any]:
    """``results``: (compute share, value or None) of each search result in trial-number order
    (for lora-tune, enqueued warm starts come first, so the nested results of the first trial
    count after all of them: a conservative order for (c))."""
    best_group = max(groups, key=statistics.fmean) if groups else []
    return {
        "results": results,
        "best": max((v for _, v in results if v is not None), default=float("nan")),
        "compute": sum(c for c, _ in results),
        "confirmed_mean": statistics.fmean(best_group) if best_group else float("nan"),
        "confirmed_std": statistics.stdev(best_group) if len(best_group) > 1 else 0.0,
        "confirm_runs": confirm_runs,
        "search_seconds": search_seconds, "confirm_seconds": confirm_seconds,
    }


def compute_to_reach(results: list[tuple[float, float | None]], target: float) -> float | None:
    """Full-trial equivalents spent until a result first reached ``target`` (None: never). lora-tune
    stores a float32 metric (0.88 reads back as 0.8799999952), the anchor a float64 one: equal
    within float32's precision is reached."""
    used = 0.0
    for share, value in results:
        used += share
        if value is not None and value >= target - 1e-6:
            return used
    return None


def judge(arms: dict[str, Any]) -> None:
    """Set each arm's ``to_anchor_best`` (when the anchor ran on this data set)."""
    if "a" in arms:
        for arm in arms.values():
            arm["to_anchor_best"] = compute_to_reach(arm["results"], arms["a"]["best"])


def report(path: Path) -> int:
    """The tables of an earlier run (``--json``), its goals judged again."""
    out = json.loads(path.read_text())
    settings = argparse.Namespace(**out["settings"])
    for name in (n for n in (*TUNED, *HELD_OUT) if n in out):
        judge(out[name])
        print(table(name, out[name], settings))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=[*TUNED, *HELD_OUT], choices=[*TUNED, *HELD_OUT])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--train-examples", type=int, default=1200)
    parser.add_argument("--dev-examples", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--evals", type=int, default=4, help="evaluations per trial (pruning points)")
    parser.add_argument("--min-steps", type=int, default=20, help="(c): study.fidelity.min_steps")
    parser.add_argument("--data-fraction", type=float, nargs="+", default=[1.0],
                        help="(c): study.fidelity.data_fraction")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=["a", "b", "c", "d", "r"], choices=list(LABELS),
                        help="run in this order; r takes the search compute of d (else c) run before it; "
                             f"the variants {', '.join(VARIANTS)} only on the tuned pair")
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (data splits, study files, "
                                                   "the lora-tune studies' databases), instead of a temporary one")
    parser.add_argument("--report", type=Path, help="print the tables of this earlier run's JSON and run nothing")
    args = parser.parse_args(argv)
    if args.report:
        return report(args.report)
    if set(args.arms) & set(VARIANTS) and set(args.datasets) & set(HELD_OUT):
        parser.error(f"the variant arms {sorted(VARIANTS)} choose defaults: run them on {list(TUNED)} only, "
                     f"not on the held-out {sorted(set(args.datasets) & set(HELD_OUT))}")
    if len(args.data_fraction) == 1:
        args.data_fraction = args.data_fraction[0]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if args.json and args.json.is_file():  # an earlier run's data sets and arms stay: a run may be made in parts
        earlier = json.loads(args.json.read_text())
        differ = [k for k in BUDGET if earlier["settings"].get(k) != out["settings"][k]]
        if differ:
            parser.error(f"{args.json} was run with other {', '.join(differ)}: its arms cannot be compared")
        out = {**earlier, "settings": out["settings"]}
    with contextlib.ExitStack() as stack:
        if args.keep:
            work = args.keep
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-search-")))
        for name in args.datasets:
            train, dev = split_data(name, work, args.train_examples, args.dev_examples, args.seed)
            arms: dict[str, Any] = dict(out.get(name, {}))  # arms run now replace the earlier run's
            for arm in args.arms:
                print(f"{name} ({arm}) ...", flush=True)
                if arm == "a":
                    arms[arm] = run_anchor(train, dev, args)
                elif arm == "r":
                    ref = arms.get("d") or arms.get("c")
                    arms[arm] = run_anchor(train, dev, args, max(1, round(ref["compute"])) if ref else args.trials)
                else:
                    arms[arm] = run_lora_tune(arm, name, train, dev, work, args)
            judge(arms)
            out[name] = arms
            print(table(name, arms, args), flush=True)
            if args.json:  # after each data set: a run of hours keeps what it finished
                args.json.write_text(json.dumps(out, indent=1))
    return 0


LABELS = {"a": "(a) Optuna TPE + median over PEFT", "b": "(b) lora-tune, previous defaults",
          "c": "(c) lora-tune, nested + Hyperband + warm start", "d": "(d) lora-tune init's study",
          "r": "(r) random search over PEFT, equal compute", "t": "(t) = (d) with TPE", "g": "(g) = (d) with GPSampler",
          "m": "(m) = (d) with the median pruner", "n": "(n) = (d) with nested ranks"}
# arms of recorded runs that cannot be run again as they were: variants of (d) when init wrote TPE
RECORDED = {"tm": "(m) = (t) with the median pruner", "tn": "(n) = (t) with nested ranks"}
TUNED, HELD_OUT = ("trec", "subj"), ("cr", "mpqa")  # defaults may be chosen on TUNED only
# the settings that make two runs' arms comparable (the same per-trial budget, data and seeds)
BUDGET = ("trials", "train_examples", "dev_examples", "max_length", "epochs", "batch_size", "evals", "seed")


def table(name: str, arms: dict[str, Any], args: argparse.Namespace) -> str:
    role = "held out: never used to choose a default" if name in HELD_OUT else "tuned pair"
    lines = [(f"\n{name} ({role}): {args.trials} trials, {args.train_examples} training examples, "
              f"{args.epochs} epoch, batch {args.batch_size}, dev {args.dev_examples}"),
             ("| arm | best (search) | confirmed best (mean ± std, 3 seeds) | search compute "
              "| compute to anchor's best | search s | confirm s |"), "|---|---|---|---|---|---|---|"]
    anchor = arms.get("a")
    for key, arm in arms.items():
        reach = arm.get("to_anchor_best")
        reach_text = "never" if reach is None else f"{reach:.2f}" + (
            f" ({reach / anchor['compute']:.0%} of (a)'s search)" if anchor and key != "a" else "")
        label = LABELS.get(key) or RECORDED[key]
        lines.append(f"| {label} | {arm['best']:.3f} | {arm['confirmed_mean']:.3f} ± {arm['confirmed_std']:.3f} "
                     f"| {arm['compute']:.2f} | {reach_text} "
                     f"| {arm['search_seconds']:.0f} | {arm['confirm_seconds']:.0f} |")
    for key in arms:
        if anchor and key not in ("a", "r"):
            misses = goal_misses(arms, key)
            lines.append(f"goal ({key}) reaches (a)'s best with <= 1/2 of (a)'s search compute, confirmed best "
                         f">= (a)'s{' and >= (r)s' if 'r' in arms else ''}: "
                         + ("; ".join(["not met", *misses]) if misses else "met"))
    return "\n".join(lines)


def goal_met(arms: dict[str, Any], key: str = "c") -> bool:
    """The goal on one data set: arm ``key`` reaches the anchor's best with at most half the
    anchor's search compute, and its confirmed best is at least the anchor's (and random search's
    at equal compute, when it ran)."""
    return not goal_misses(arms, key)


def goal_misses(arms: dict[str, Any], key: str = "c") -> list[str]:
    """What arm ``key`` misses of :func:`goal_met`, with the numbers (empty: met)."""
    a, arm = arms["a"], arms[key]
    misses = []
    reach = arm["to_anchor_best"]
    if reach is None:
        misses.append(f"never reached (a)'s best {a['best']:.3f} (its best: {arm['best']:.3f})")
    elif reach > a["compute"] / 2:
        misses.append(f"reached (a)'s best with {reach:.2f}, more than half of (a)'s {a['compute']:.2f}")
    for other in ("a", "r"):
        if other in arms and arm["confirmed_mean"] < arms[other]["confirmed_mean"]:
            misses.append(f"confirmed {arm['confirmed_mean']:.3f} < ({other})'s {arms[other]['confirmed_mean']:.3f}")
    return misses


if __name__ == "__main__":
    raise SystemExit(main())
