"""Evaluation: retrieval (ITC top-k + ITM re-ranking, Recall@K), caption metrics, VQA accuracy.

Functions take plain Python inputs and return JSON-serialisable results (score matrices are
tensors; `recall_at_k` turns them into floats).
"""

from .caption_metrics import caption_scores, ptb_tokenize
from .retrieval import recall_at_k, retrieval_scores

__all__ = ["caption_scores", "ptb_tokenize", "recall_at_k", "retrieval_scores"]
