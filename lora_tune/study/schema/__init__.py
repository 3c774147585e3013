"""The study file: its schema, search space, bounded YAML reading, model templates and coverage."""
