"""Evaluation on held-out test sets, during training (`eval` config section) and outside it (`lmmrl-eval`).

  config.py      EvalConfig / EvalSetConfig: the sets, when to evaluate, sampling, which reward functions score
  evaluator.py   Evaluator: data layer -> rollout group's generate -> reward scorer -> eval/<set>/... metrics
  summary.py     before/after tables (from results, or from a run's metrics.jsonl)
  standalone.py  lmmrl-eval's driver: a rollout group per model, samples.jsonl and summary.md

Only config.py is imported by the run schema; the rest loads torch, transformers and Ray when used.
"""
