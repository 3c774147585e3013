"""Creating, loading and optimizing studies: the runner, the worker loop, samplers, warm start,
progress."""
