"""Evaluation: re-ID retrieval metrics (two protocols) and result reporting."""
from __future__ import annotations

from fedreid_jax.evaluation.reference_metrics import PROTOCOLS
from fedreid_jax.evaluation.reference_metrics import evaluate_rankings_reference
from fedreid_jax.evaluation.retrieval import evaluate_features
from fedreid_jax.evaluation.retrieval import evaluate_rankings
from fedreid_jax.evaluation.retrieval import ranking_statistics
from fedreid_jax.evaluation.retrieval import summarize

__all__ = [
    "PROTOCOLS",
    "evaluate_features",
    "evaluate_rankings",
    "evaluate_rankings_reference",
    "ranking_statistics",
    "summarize",
]
