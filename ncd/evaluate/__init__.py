"""Evaluation: metrics, label-free K and model selection, collapse checks, open set, report and plots."""
