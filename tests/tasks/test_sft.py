"""sft: label masks against hand-rendered templates, token-weighted eval loss, truncation,
packing, bad input, every model family, and greedy generation with left padding."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lora_tune.errors import ConfigError
from lora_tune.models.tiny_lm import CHAT_TEMPLATE, TINY_SIZES, tiny_config
from lora_tune.tasks import build_task, validate_task_spec
from lora_tune.tasks.chat_data import IGNORE, Renderer
from lora_tune.tasks.generation import greedy_generate
from tests.tasks.conftest import write_table

pytestmark = pytest.mark.usefixtures("sft_cache")

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512}
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
PAIRS = [("What is 12 plus 35?", "47"), ("Reverse the words: red blue green", "green blue red"),
         ("What is the capital of France?", "Paris"), ("Spell backwards: cat", "tac"),
         ("What is 9 minus 4?", "5"), ("What is the capital of Peru?", "The capital of Peru is Lima")]


def chat(*pairs, system=False):
    messages = [SYSTEM] if system else []
    for prompt, answer in pairs:
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


CONVERSATIONS = [chat(PAIRS[0]), chat(PAIRS[1], PAIRS[2], system=True), chat(PAIRS[3], PAIRS[4], PAIRS[5]),
                 chat(PAIRS[5], system=True), chat(PAIRS[2], PAIRS[0])]
PC_ROWS = [{"prompt": p, "completion": c} for p, c in PAIRS]


def spec_for(tmp_path, tokenizer_dir, train_rows, eval_rows=None, model=None, **extra):
    train = write_table(tmp_path / "train.jsonl", train_rows)
    held_out = write_table(tmp_path / "eval.jsonl", eval_rows or train_rows)
    return {"type": "sft", "model": {"config": dict(model or LLAMA)}, "tokenizer": str(tokenizer_dir),
            "train_file": str(train), "eval_file": str(held_out), **extra}


def tokens(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def by_hand(tokenizer, pieces):
    """ids and labels of (text, supervised) pieces tokenized one by one; the first label is IGNORE."""
    ids, labels = [], []
    for text, supervised in pieces:
        piece = tokens(tokenizer, text)
        ids += piece
        labels += piece if supervised else [IGNORE] * len(piece)
    return ids, [IGNORE] + labels[1:]


def tiny_template_pieces(messages, train_on="completion"):
    """The tiny template (<|bos|><|role|>\\ncontent<|end|>...) written out by hand."""
    pieces = [("<|bos|>", train_on == "all")]
    for m in messages:
        pieces.append((f"<|{m['role']}|>\n", train_on == "all"))
        pieces.append((m["content"] + "<|end|>", train_on == "all" or m["role"] == "assistant"))
    return pieces


# -- label masks ----------------------------------------------------------------------------

def test_prompt_completion_supervises_the_completion_and_end_of_turn(tmp_path, chat_tokenizer_dir):
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, PC_ROWS))
    assert task.format == "prompt-completion" and task.train_on == "completion"
    for row, example in zip(PC_ROWS, task.train.examples):
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        ids, labels = by_hand(task.tokenizer, tiny_template_pieces(messages))
        assert example.input_ids == ids and example.labels == labels
        supervised = task.tokenizer.decode([t for t in example.labels if t != IGNORE])
        assert supervised == row["completion"] + "<|end|>"
        assert task.tokenizer.decode(example.prompt_ids) == f"<|bos|><|user|>\n{row['prompt']}<|end|><|assistant|>\n"
        assert example.reference == row["completion"]


def test_multi_turn_messages_supervise_every_assistant_turn(tmp_path, chat_tokenizer_dir):
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS))
    assert task.format == "messages"
    for row, example in zip(CONVERSATIONS, task.train.examples):
        ids, labels = by_hand(task.tokenizer, tiny_template_pieces(row["messages"]))
        assert example.input_ids == ids and example.labels == labels
        answers = [m["content"] + "<|end|>" for m in row["messages"] if m["role"] == "assistant"]
        assert task.tokenizer.decode([t for t in example.labels if t != IGNORE]) == "".join(answers)
    assert task.train.content_only_turns == 0 and task.warnings == []


def test_train_on_all_supervises_every_token_but_the_first(tmp_path, chat_tokenizer_dir):
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS, train_on="all"))
    for row, example in zip(CONVERSATIONS, task.train.examples):
        assert example.labels == by_hand(task.tokenizer, tiny_template_pieces(row["messages"], "all"))[1]
        assert example.labels[1:] == example.input_ids[1:]


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("as_file", [False, True], ids=["string", "file"])
def test_a_given_chat_template_decides_the_spans(tmp_path, chat_tokenizer_dir, as_file):
    template = CHATML
    if as_file:
        (tmp_path / "chatml.jinja").write_text(CHATML)
        template = str(tmp_path / "chatml.jinja")
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS[1:3], chat_template=template))
    for row, example in zip(CONVERSATIONS[1:3], task.train.examples):
        pieces = []
        for m in row["messages"]:
            if m["role"] == "assistant":
                pieces += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>\n", True)]
            else:
                pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
        assert (example.input_ids, example.labels) == by_hand(task.tokenizer, pieces)


# The tiny template and ChatML with {% generation %} around what the assistant writes: they render
# exactly as without it, and there the tokenizer's assistant mask decides what is supervised.
TINY_GENERATION = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}"
                   "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|end|>' }}{% endgeneration %}"
                   "{% else %}{{ m['content'] + '<|end|>' }}{% endif %}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
CHATML_GENERATION = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                     "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
                     "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template, without, end", [(TINY_GENERATION, CHAT_TEMPLATE, "<|end|>"),
                                                   (CHATML_GENERATION, CHATML, "<|im_end|>\n")], ids=["tiny", "chatml"])
def test_generation_mask_and_own_spans_agree(tmp_path, chat_tokenizer_dir, template, without, end):
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS, chat_template=template))
    renderer = task.renderer
    assert renderer.marks_generation and not Renderer(task.tokenizer, without, "completion").marks_generation
    assert renderer.render(CONVERSATIONS[2]["messages"]) == task.tokenizer.apply_chat_template(
        CONVERSATIONS[2]["messages"], chat_template=without, tokenize=False)
    for row, example in zip(CONVERSATIONS, task.train.examples):
        ids, labels = renderer.generation_labels(row["messages"])  # Hugging Face's mask
        assert (ids, labels, 0) == renderer.span_labels(row["messages"])  # lora-tune's spans
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert task.tokenizer.decode([t for t in labels if t != IGNORE]) == end.join(answers) + end
        assert (example.input_ids, example.labels) == (ids, [IGNORE] + labels[1:])
        own = Renderer(task.tokenizer, without, "completion").encode_messages(row["messages"])
        assert (example, 0) == own  # the same example as the template without generation blocks
    assert sum(len(m["messages"]) > 2 for m in CONVERSATIONS) >= 3  # multi-turn data


def test_a_generation_block_decides_what_is_supervised(tmp_path, chat_tokenizer_dir):
    content_only = TINY_GENERATION.replace("{% generation %}{{ m['content'] + '<|end|>' }}{% endgeneration %}",
                                           "{% generation %}{{ m['content'] }}{% endgeneration %}{{ '<|end|>' }}")
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS, chat_template=content_only))
    for row, example in zip(CONVERSATIONS, task.train.examples):
        pieces = [("<|bos|>", False)]
        for m in row["messages"]:
            pieces += [(f"<|{m['role']}|>\n", False), (m["content"], m["role"] == "assistant"), ("<|end|>", False)]
        assert (example.input_ids, example.labels) == by_hand(task.tokenizer, pieces)
    assert task.train.content_only_turns == 0 and task.warnings == []


# Templates that render a turn differently once later turns follow (not prefix-stable):
# EOS after the last message only (as Phi-3's does), and a think block on the last assistant turn only.
EOS_AT_END = CHAT_TEMPLATE + "{% if not add_generation_prompt %}{{ eos_token }}{% endif %}"
THINK_ON_LAST = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}"
                 "{% if loop.last and m['role'] == 'assistant' %}{{ '<think></think>' }}{% endif %}"
                 "{{ m['content'] + '<|end|>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def test_a_turn_ends_where_the_template_renderings_part(tmp_path, chat_tokenizer_dir):
    row = chat(PAIRS[1], PAIRS[2])
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, [row], chat_template=EOS_AT_END))
    pieces = tiny_template_pieces(row["messages"]) + [("<|end|>", True)]  # every turn keeps its <|end|>
    example = task.train.examples[0]
    assert (example.input_ids, example.labels) == by_hand(task.tokenizer, pieces)
    assert task.train.content_only_turns == 0 and task.warnings == []


def test_turns_rendered_differently_inside_fall_back_to_their_content(tmp_path, chat_tokenizer_dir):
    row = chat(PAIRS[1], PAIRS[2])
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, [row], chat_template=THINK_ON_LAST))
    user1, answer1, user2, answer2 = (m["content"] for m in row["messages"])
    pieces = [("<|bos|><|user|>\n" + user1 + "<|end|><|assistant|>\n", False), (answer1, True),
              ("<|end|><|user|>\n" + user2 + "<|end|><|assistant|>\n", False),
              ("<think></think>" + answer2 + "<|end|>", True)]
    example = task.train.examples[0]
    assert (example.input_ids, example.labels) == by_hand(task.tokenizer, pieces)
    assert task.train.content_only_turns == 1 and "content strings" in task.warnings[0]


def test_plain_concatenation_without_a_chat_template(tmp_path, plain_tokenizer_dir):
    rows = [{"prompt": "Q: what is 2 plus 2?\nA:", "completion": " 4"},
            {"prompt": "Spell backwards: cat\n", "completion": "tac"}]
    task = build_task(spec_for(tmp_path, plain_tokenizer_dir, rows))
    assert task.renderer.template is None
    eos = task.tokenizer.eos_token_id
    for row, example in zip(rows, task.train.examples):
        prompt, completion = tokens(task.tokenizer, row["prompt"]), tokens(task.tokenizer, row["completion"])
        assert example.input_ids == prompt + completion + [eos]
        assert example.labels == [IGNORE] * len(prompt) + completion + [eos]
        assert example.prompt_ids == prompt


def test_text_format_supervises_everything(tmp_path, chat_tokenizer_dir):
    rows = [{"text": "green blue red"}, {"text": "What is the capital of France? Paris"}]
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, rows))
    assert task.format == "text" and task.train_on == "all"
    for row, example in zip(rows, task.train.examples):
        assert example.input_ids == tokens(task.tokenizer, row["text"]) + [task.tokenizer.eos_token_id]
        assert example.labels == [IGNORE] + example.input_ids[1:]


# -- loss, truncation, packing --------------------------------------------------------------

def test_eval_loss_is_token_weighted_cross_entropy_over_assistant_tokens(tmp_path, chat_tokenizer_dir):
    model_config = dict(LLAMA, initializer_range=0.5)  # examples with clearly different losses
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS, model=model_config))
    model = task.build_model()
    total, count, per_example = 0.0, 0, []
    with torch.no_grad():
        for row in CONVERSATIONS:
            ids, labels = by_hand(task.tokenizer, tiny_template_pieces(row["messages"]))
            logits = model(torch.tensor([ids])).logits[0, :-1]
            targets = torch.tensor(labels[1:])
            keep = targets != IGNORE
            summed = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
            total, count = total + float(summed), count + int(keep.sum())
            per_example.append(float(summed) / int(keep.sum()))
    metrics = task.evaluate(model, 2)  # padded batches of different lengths
    assert math.isclose(metrics["eval_loss"], total / count, rel_tol=1e-5)
    assert math.isclose(metrics["perplexity"], math.exp(total / count), rel_tol=1e-5)
    assert abs(sum(per_example) / len(per_example) - total / count) > 1e-3  # weighting matters here
    batch = next(iter(task.train_batches(5, 0, 0)))
    with torch.no_grad():
        assert math.isclose(float(task.loss(model, batch)), total / count, rel_tol=1e-5)
    assert task.loss_weight(batch) == count
    assert task.batch_tokens(batch) == sum(len(by_hand(task.tokenizer, tiny_template_pieces(r["messages"]))[0])
                                           for r in CONVERSATIONS)


def test_right_padding_is_never_supervised_and_batches_are_deterministic(tmp_path, chat_tokenizer_dir):
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS))
    first = list(task.train_batches(2, 7, 1))
    again = list(task.train_batches(2, 7, 1))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    for batch in first:
        padding = batch["attention_mask"] == 0
        assert (batch["labels"][padding] == IGNORE).all() and (batch["input_ids"][padding] == task.pad_id).all()
        assert batch["attention_mask"][:, 0].all()  # right padding
        assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())  # own longest
    assert sum(len(b["input_ids"]) for b in first) == task.num_train_examples() == len(CONVERSATIONS)


def test_examples_longer_than_max_length_are_dropped_and_counted(tmp_path, chat_tokenizer_dir):
    lengths = [len(by_hand(build_task(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS[:1])).tokenizer,
                           tiny_template_pieces(r["messages"]))[0]) for r in CONVERSATIONS]
    short = min(lengths)
    kept = lengths.count(short)
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS, max_length=short))
    assert len(task.train.examples) == kept and task.train.too_long == len(CONVERSATIONS) - kept > 0
    dropped = len(CONVERSATIONS) - kept
    assert task.describe()["dropped_too_long"] == {"train": dropped, "eval": dropped}
    assert any("longer than max_length" in w for w in task.warnings)
    with pytest.raises(ConfigError) as info:
        build_task(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS, max_length=short - 1))
    assert info.value.field == "task.max_length"


def test_packing_keeps_labels_positions_and_attention_per_example(tmp_path, chat_tokenizer_dir):
    rows = CONVERSATIONS * 3
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, rows, packing=True, max_length=96, seed=1))
    assert task.packing_isolated and task.describe()["packed_blocks"] == len(task.blocks) < len(rows)
    examples = {tuple(e.input_ids): e for e in task.train.examples}
    seen = 0
    for block in task.blocks:
        assert len(block.input_ids) <= 96
        starts = [i for i, p in enumerate(block.position_ids) if p == 0]
        for start, end in zip(starts, starts[1:] + [len(block.input_ids)]):
            example = examples[tuple(block.input_ids[start:end])]
            assert block.labels[start:end] == example.labels and block.labels[start] == IGNORE
            assert block.position_ids[start:end] == list(range(end - start))
            seen += 1
    assert seen == len(rows)
    model = task.build_model()
    batch = next(iter(task.train_batches(len(task.blocks), 0, 0)))
    assert "position_ids" in batch
    with torch.no_grad():
        packed_sum, packed_count = task.token_loss(model, batch)
        alone = [task.token_loss(model, task.to_device(_one(e, task.pad_id), "cpu")) for e in task.train.examples]
    assert packed_count == sum(n for _, n in alone)
    assert math.isclose(float(packed_sum), sum(float(s) for s, _ in alone), rel_tol=1e-4)


def _one(example, pad_id):
    from lora_tune.tasks.sft import collate

    return collate([example], pad_id, False)


def test_packing_on_a_model_that_mixes_examples_is_reported(tmp_path, chat_tokenizer_dir):
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS, model=tiny_config("opt"), packing=True,
                               max_length=128))
    assert not task.packing_isolated and "attend across" in task.warnings[-1]
    batch = next(iter(task.train_batches(4, 0, 0)))
    assert "position_ids" not in batch and math.isfinite(float(task.loss(task.build_model(), batch).detach()))


def _loss_and_grads(task, model, batch):
    model.zero_grad(set_to_none=True)
    loss = task.loss(model, batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_gradients_and_eval_match_the_full_logits_computation(tmp_path, chat_tokenizer_dir, monkeypatch):
    # the loss runs the output layer over the supervised positions in chunks (tasks/lm_loss.py);
    # LORA_TUNE_LM_LOSS=full is the computation the task did before
    from lora_tune import LoraConfig, inject

    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS * 2, packing=True, max_length=96))
    assert task.lm_split and task.packing_isolated
    model = task.build_model()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        inject(model, LoraConfig(rank=4, alpha=8, init="gaussian", targets=["lm_head", ".q_proj", ".v_proj"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.normal_(std=0.05)
    packed = next(iter(task.train_batches(4, 0, 0)))
    padded = task.to_device(_one(task.eval.examples[0], task.pad_id), "cpu")
    assert "position_ids" in packed
    results = {}
    for backend in ("full", "auto"):
        monkeypatch.setenv("LORA_TUNE_LM_LOSS", backend)
        results[backend] = ([_loss_and_grads(task, model, b) for b in (packed, padded)], task.evaluate(model, 2))
    for (loss, grads), (loss_full, grads_full) in zip(results["auto"][0], results["full"][0]):
        assert math.isclose(loss, loss_full, rel_tol=1e-6)
        assert grads.keys() == grads_full.keys() and "lm_head.lora_A" in grads
        for name in grads:
            torch.testing.assert_close(grads[name], grads_full[name], atol=1e-6, rtol=1e-5)
    for metric in ("eval_loss", "perplexity"):
        assert math.isclose(results["auto"][1][metric], results["full"][1][metric], rel_tol=1e-6)


# -- model families -------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", sorted(TINY_SIZES))
def test_every_family_builds_trains_and_evaluates(tmp_path, chat_tokenizer_dir, model_type):
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS[:3], model=tiny_config(model_type)))
    model = task.build_model()
    assert model.config.model_type == model_type and model.config.use_cache is False
    assert task.lm_split  # the chunked loss (tasks/lm_loss.py), no full-vocabulary logits
    assert model.get_input_embeddings().num_embeddings == len(task.tokenizer)
    assert task.weight_dtype == torch.float32
    loss = task.loss(model, next(iter(task.train_batches(3, 0, 0))))
    loss.backward()
    assert math.isfinite(float(loss.detach())) and model.get_input_embeddings().weight.grad is not None
    assert math.isfinite(task.evaluate(model, 2)["eval_loss"])


def test_model_directory_with_its_tokenizer_and_bf16_weights(tmp_path, chat_tokenizer_dir):
    from transformers import AutoTokenizer

    from lora_tune.models.tiny_lm import save_tiny_model

    save_tiny_model("qwen2", tmp_path / "qwen", tokenizer=AutoTokenizer.from_pretrained(str(chat_tokenizer_dir)))
    spec = spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS[:2], dtype="bfloat16")
    spec["model"] = str(tmp_path / "qwen")
    del spec["tokenizer"]
    task = build_task(spec)
    assert task.weight_dtype == torch.bfloat16 and task.model_ref == str(tmp_path / "qwen")
    assert next(task.build_model().parameters()).dtype == torch.bfloat16
    assert math.isfinite(task.evaluate(task.build_model(), 2)["eval_loss"])


def test_config_models_are_seeded(tmp_path, chat_tokenizer_dir):
    def head(seed):
        task = build_task(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS[:1], seed=seed))
        return task.build_model().lm_head.weight

    assert torch.equal(head(0), head(0)) and not torch.equal(head(0), head(1))


# -- generation -----------------------------------------------------------------------------

def _greedy_by_hand(model, prompt, stop_ids, max_new_tokens):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            if token in stop_ids:
                break
            ids.append(token)
    return ids[len(prompt):]


def test_batched_left_padded_generation_matches_one_by_one(tmp_path, chat_tokenizer_dir):
    model_config = dict(LLAMA, initializer_range=0.5)  # confident logits: no near-ties in the argmax
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS, model=model_config,
                               generate={"max_new_tokens": 6}))
    generation = task.generation
    assert task.metrics == ("eval_loss", "perplexity", "exact_match")
    assert generation.stop_ids == [task.tokenizer.eos_token_id]
    assert len({len(p) for p in generation.prompts}) > 2  # left padding is exercised
    model = task.build_model()
    kwargs = {"pad_id": task.pad_id, "stop_ids": generation.stop_ids, "max_new_tokens": 6}
    batched = greedy_generate(model, generation.prompts, batch_size=4, **kwargs)
    single = greedy_generate(model, generation.prompts, batch_size=1, **kwargs)
    assert batched == single
    assert single == [_greedy_by_hand(model, p, generation.stop_ids, 6) for p in generation.prompts]
    predictions = generation.predictions(model, 4)
    assert predictions == [task.tokenizer.decode(x, skip_special_tokens=True).strip() for x in batched]
    expected = sum(p == r for p, r in zip(predictions, generation.references)) / len(predictions)
    assert task.evaluate(model, 4)["exact_match"] == expected
    assert model.training is False


def test_contains_and_a_user_metric_function(tmp_path, chat_tokenizer_dir):
    (tmp_path / "my_metric.py").write_text("def always_half(prediction, reference):\n    return 0.5\n")
    task = build_task(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS,
                               generate={"metric": f"{tmp_path / 'my_metric.py'}:always_half", "max_examples": 2}))
    assert task.metrics[-1] == "always_half" and len(task.generation.prompts) == 2
    assert task.evaluate(task.build_model(), 2)["always_half"] == 0.5
    from lora_tune.tasks.generation import contains, exact_match

    assert contains("it is Paris.", "Paris") == 1.0 and exact_match("it is Paris.", "Paris") == 0.0


# -- bad input ------------------------------------------------------------------------------

def _error(spec) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build_task(spec)
    return info.value


def test_unknown_role_names_the_column_and_the_roles(tmp_path, chat_tokenizer_dir):
    rows = [chat(PAIRS[0]), {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}]
    error = _error(spec_for(tmp_path, chat_tokenizer_dir, rows))
    assert error.field == "task.messages_column"
    assert "'bot'" in str(error) and "system, user, assistant, tool" in str(error) and "row 2" in str(error)


def test_missing_column_names_file_column_and_columns_present(tmp_path, chat_tokenizer_dir):
    error = _error(spec_for(tmp_path, chat_tokenizer_dir, PC_ROWS, format="prompt-completion",
                            prompt_column="question"))
    assert error.field == "task.prompt_column"
    assert "question" in str(error) and "train.jsonl" in str(error) and "prompt, completion" in str(error)


def test_no_known_layout_is_a_format_error(tmp_path, chat_tokenizer_dir):
    error = _error(spec_for(tmp_path, chat_tokenizer_dir, [{"question": "a", "answer": "b"}]))
    assert error.field == "task.format" and "question, answer" in str(error)


@pytest.mark.parametrize("completion", ["", "   ", None])
def test_empty_completion(tmp_path, chat_tokenizer_dir, completion):
    rows = PC_ROWS[:2] + [{"prompt": "What?", "completion": completion}]
    error = _error(spec_for(tmp_path, chat_tokenizer_dir, rows))
    assert error.field == "task.completion_column" and "row 3" in str(error)


def test_empty_assistant_message(tmp_path, chat_tokenizer_dir):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}]
    assert _error(spec_for(tmp_path, chat_tokenizer_dir, rows)).field == "task.messages_column"


def test_messages_need_a_chat_template(tmp_path, plain_tokenizer_dir):
    error = _error(spec_for(tmp_path, plain_tokenizer_dir, CONVERSATIONS))
    assert error.field == "task.chat_template"


def test_metric_that_cannot_be_imported(tmp_path, chat_tokenizer_dir):
    error = _error(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS,
                            generate={"metric": "no_such_module_xyz:score"}))
    assert error.field == "task.generate.metric" and "no_such_module_xyz" in str(error)


def test_spec_problems_are_listed_with_paths(tmp_path, chat_tokenizer_dir):
    spec = spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS, format="chat", train_on="assistant", dtype="int8",
                    eval_fraction=0.2, packing="yes", generate={"metric": "bleu", "max_new_tokens": 0, "beams": 2},
                    chat_template="no/such/template.jinja", colour="red")
    spec["model"]["config"]["hidden_sise"] = 8
    problems = dict(validate_task_spec(spec))
    assert set(problems) == {
        "task.format", "task.train_on", "task.dtype", "task.eval_fraction", "task.packing", "task.generate.metric",
        "task.generate.max_new_tokens", "task.generate.beams", "task.chat_template", "task.colour",
        "task.model.config.hidden_sise"}
    assert "messages, prompt-completion, text" in problems["task.format"].replace("'", "")
    assert "hidden_size" in problems["task.model.config.hidden_sise"]
    assert _error(spec).field in problems
    bare = {"type": "sft", "model": {"config": {"model_type": "vit"}}, "train_file": str(tmp_path / "none.jsonl")}
    problems = dict(validate_task_spec(bare))
    assert set(problems) == {"task.model.config.model_type", "task.tokenizer", "task.train_file"}
    text = {"type": "sft", "model": {"config": dict(LLAMA)}, "tokenizer": str(chat_tokenizer_dir), "format": "text",
            "train_on": "completion", "generate": {}, "train_file": spec["train_file"]}
    assert set(dict(validate_task_spec(text))) == {"task.train_on", "task.generate"}


def test_a_template_that_refuses_the_data(tmp_path, chat_tokenizer_dir):
    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                 + CHATML)
    error = _error(spec_for(tmp_path, chat_tokenizer_dir, CONVERSATIONS, chat_template=no_system))
    assert error.field == "task.chat_template" and "row 2" in str(error) and "System role not supported" in str(error)
