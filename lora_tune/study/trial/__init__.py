"""One trial: its record, the objective, nested-rank scoring, the trial process, confirmation runs
and adapter artifacts."""
