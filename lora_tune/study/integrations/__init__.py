"""Pruning callbacks that bind another framework's trainer (Hugging Face ``Trainer``, Lightning) to a
lora-tune trial."""
