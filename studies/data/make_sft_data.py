"""Make the small instruction data set of studies/sft-*.yaml (deterministic; rerun to rebuild).

    python studies/data/make_sft_data.py

Writes studies/data/sft/:

* ``train.jsonl`` / ``eval.jsonl`` — ``messages`` conversations (some with a system message, some
  with two or three exchanges);
* ``train-pc.jsonl`` / ``eval-pc.jsonl`` — the first exchange of each as ``prompt`` / ``completion``;
* ``tokenizer/`` — a byte-level BPE chat tokenizer trained on all the texts
  (:func:`lora_tune.models.tiny_lm.build_chat_tokenizer`).

The tasks are ones a tiny model can learn a little of: adding and subtracting small numbers,
reversing a few words, the capital of a country from a fixed table, and spelling a word backwards.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from lora_tune.models.tiny_lm import build_chat_tokenizer

OUT = Path(__file__).resolve().parent / "sft"
SEED = 0
N_TRAIN, N_EVAL = 400, 60
SYSTEM = "You are a terse assistant. Answer with the answer only."

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Austria": "Vienna", "Poland": "Warsaw", "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin", "Hungary": "Budapest",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Chile": "Santiago", "Canada": "Ottawa", "Mexico": "Mexico City", "Cuba": "Havana",
}
WORDS = ("red", "blue", "green", "cat", "dog", "fish", "sun", "moon", "tree", "rock", "bird", "milk",
         "bread", "lamp", "door", "book")

Pair = tuple[str, str]


def addition(rng: random.Random) -> Pair:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"What is {a} plus {b}?", str(a + b)


def subtraction(rng: random.Random) -> Pair:
    a = rng.randint(10, 99)
    b = rng.randint(0, a)
    return f"What is {a} minus {b}?", str(a - b)


def reverse_words(rng: random.Random) -> Pair:
    words = rng.sample(WORDS, rng.randint(2, 4))
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def capital(rng: random.Random) -> Pair:
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", CAPITALS[country]


def spell_backwards(rng: random.Random) -> Pair:
    word = rng.choice(WORDS)
    return f"Spell backwards: {word}", word[::-1]


TASKS: tuple[Callable[[random.Random], Pair], ...] = (addition, subtraction, reverse_words, capital, spell_backwards)


def conversation(rng: random.Random) -> dict:
    """Mostly one exchange; a fifth of them two or three; a quarter with the system message."""
    turns = 1 if rng.random() < 0.8 else rng.randint(2, 3)
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.25 else []
    for _ in range(turns):
        prompt, answer = rng.choice(TASKS)(rng)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def prompt_completion(row: dict) -> dict:
    """The first exchange of a conversation as prompt/completion."""
    user, assistant = [m for m in row["messages"] if m["role"] != "system"][:2]
    return {"prompt": user["content"], "completion": assistant["content"]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(SEED)
    rows = [conversation(rng) for _ in range(N_TRAIN + N_EVAL)]
    train, held_out = rows[:N_TRAIN], rows[N_TRAIN:]
    OUT.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT / "train.jsonl", train)
    write_jsonl(OUT / "eval.jsonl", held_out)
    for name, part in (("train-pc.jsonl", train), ("eval-pc.jsonl", held_out)):
        write_jsonl(OUT / name, [prompt_completion(r) for r in part])
    texts = [m["content"] for r in rows for m in r["messages"]]
    build_chat_tokenizer(texts, OUT / "tokenizer", vocab_size=400)
    print(f"wrote {len(train)} + {len(held_out)} conversations and a tokenizer to {OUT}")


if __name__ == "__main__":
    main()
