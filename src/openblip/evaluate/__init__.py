"""Evaluation: retrieval (ITC top-k + ITM re-ranking, Recall@K), caption metrics, VQA accuracy.

Functions take plain Python inputs (lists, dicts keyed by id) and return plain dicts of floats,
ready for JSON; only `retrieval_scores` returns tensors, which `recall_at_k` turns into floats.
"""

from .caption_metrics import caption_scores, ptb_tokenize
from .retrieval import recall_at_k, retrieval_scores
from .vqa_accuracy import exact_match_accuracy, normalize_answer, vqa_accuracy, vqa_score

__all__ = [
    "caption_scores",
    "exact_match_accuracy",
    "normalize_answer",
    "ptb_tokenize",
    "recall_at_k",
    "retrieval_scores",
    "vqa_accuracy",
    "vqa_score",
]
