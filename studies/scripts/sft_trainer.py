"""A training script as a user has it: TRL's SFTTrainer on prompt/completion data (loss on the
completions), as a factory lora-tune calls.

lora-tune gives ``model`` (already adapted with the trial's LoRA config), ``tokenizer`` (the
task's), ``params`` (the trial's sampled values), ``callbacks`` (pass them on: they report every
evaluation and stop a pruned trial) and ``output_dir``. Any other keyword comes from the study
file's ``task.args``, as written (``train_file`` is read from the directory lora-tune runs in).
Training settings the study sets (learning rate, batch size, accumulation, schedule, warmup,
LoRA+ ...) replace the values below; the rest are the script's own. The trainer is returned
untrained, around ``model`` as given (no ``peft_config``: lora-tune adapts the model).
"""
from __future__ import annotations


def make_trainer(model, tokenizer, params, callbacks, output_dir, train_file, eval_file,
                 max_length=128, eval_steps=10):
    import torch
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    data = load_dataset("json", data_files={"train": train_file, "eval": eval_file})
    args = SFTConfig(
        output_dir=output_dir, per_device_train_batch_size=16, per_device_eval_batch_size=32,
        num_train_epochs=4, learning_rate=2e-3, eval_strategy="steps", eval_steps=eval_steps,
        save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        max_length=max_length, completion_only_loss=True, activation_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return SFTTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["eval"],
                      processing_class=tokenizer, callbacks=callbacks)
