"""Evaluation: per-subject fidelity and leakage metrics (plain torch) and the benchmark runner (evaluation.bench)."""
