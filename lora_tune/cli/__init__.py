"""The `lora-tune` command line: thin click commands over the library."""
