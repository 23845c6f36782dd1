"""VQA answer ranking over a candidate list (BLIP's reported 'rank' inference).

Step 1 prunes the list: one decoder step from [DEC] gives the probability of
each candidate's first token and keeps the ``k`` best. Step 2 teacher-forces
those ``k`` answers and picks the lowest summed token loss. As in the original,
that loss keeps label smoothing 0.1, so the score is not a pure log-likelihood
(reference quirk L.4); pass ``label_smoothing=0.0`` for the plain one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .med import CrossKV, TextDecoder, cross_batch


def sequence_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Summed next-token cross-entropy per sequence: logits (N,L,V), ids/mask (N,L) -> (N,)."""
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, reduction="none", label_smoothing=label_smoothing
    )
    return loss.sum(dim=1)


@torch.no_grad()
def rank_answers(
    decoder: TextDecoder,
    cross_kv: list[CrossKV],
    cross_mask: torch.Tensor | None,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    k: int = 128,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """Index of the best candidate answer for each of B questions.

    ``cross_kv``: the decoder's cross-attention keys/values of the B question
    encodings; ``answer_ids`` (A, La) start with [DEC] and end with [SEP].
    """
    b = cross_batch(cross_kv[0])
    a = answer_ids.shape[0]
    k = min(k, a)
    start = answer_ids[:1, :1].expand(b, 1)  # [DEC] for every question
    first, _ = decoder(start, cross_kv=cross_kv, encoder_attention_mask=cross_mask)
    first_prob = first[:, 0].float().softmax(dim=-1).index_select(1, answer_ids[:, 1])  # (B, A)
    top_ids = first_prob.topk(k, dim=1).indices  # (B, k)
    flat = top_ids.reshape(-1)
    ids, mask = answer_ids.index_select(0, flat), answer_mask.index_select(0, flat)  # (B*k, La)
    # The k candidates of a question share its keys/values: the decoder folds them.
    logits, _ = decoder(ids, mask, cross_kv=cross_kv, encoder_attention_mask=cross_mask)
    scores = -sequence_loss(logits, ids, mask, label_smoothing).view(b, k)
    return top_ids.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
