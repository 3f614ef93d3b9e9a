"""Training: the loop, its metrics log (metrics.jsonl) and loss plots."""
