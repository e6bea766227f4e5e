"""Evaluation: re-ID retrieval metrics (two protocols) and result reporting."""
from __future__ import annotations

from fedreid_jax.evaluation.reference_metrics import PROTOCOLS
from fedreid_jax.evaluation.reference_metrics import evaluate_rankings_reference
from fedreid_jax.evaluation.re_ranking import evaluate_re_ranking
from fedreid_jax.evaluation.re_ranking import re_ranking
from fedreid_jax.evaluation.re_ranking import re_ranking_from_features
from fedreid_jax.evaluation.retrieval import evaluate_features
from fedreid_jax.evaluation.retrieval import evaluate_rankings
from fedreid_jax.evaluation.retrieval import ranking_statistics
from fedreid_jax.evaluation.retrieval import summarize

__all__ = [
    "PROTOCOLS",
    "evaluate_features",
    "evaluate_rankings",
    "evaluate_rankings_reference",
    "evaluate_re_ranking",
    "ranking_statistics",
    "re_ranking",
    "re_ranking_from_features",
    "summarize",
]
