"""Evaluation: pyiqa harness (offline-first), paper and ablation tables, plots."""
