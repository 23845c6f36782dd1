import math

import pytest
import torch

from openblip.losses.lm import lm_loss, mask_prompt_and_padding


def _manual_token_loss(logits_row, target, eps):
    # Label smoothing as PyTorch defines it: targets (1 - eps) * onehot + eps / V.
    log_z = math.log(sum(math.exp(v) for v in logits_row))
    logp = [v - log_z for v in logits_row]
    vocab = len(logits_row)
    return -(1 - eps) * logp[target] - eps / vocab * sum(logp)


def _example():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g)
    labels = torch.tensor([[101, 3, 1, -100], [101, 4, -100, -100]])
    return logits, labels


def _manual_per_sequence(logits, labels, eps):
    sums, count = [], 0
    for b in range(labels.shape[0]):
        total = 0.0
        for t in range(labels.shape[1] - 1):
            target = labels[b, t + 1].item()
            if target == -100:
                continue
            total += _manual_token_loss(logits[b, t].tolist(), target, eps)
            count += 1
        sums.append(total)
    return sums, count


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_reductions_match_manual_formula(eps):
    logits, labels = _example()
    sums, count = _manual_per_sequence(logits, labels, eps)
    none = lm_loss(logits, labels, label_smoothing=eps, reduction="none")
    assert none.shape == (2,)
    assert none.tolist() == pytest.approx(sums, abs=1e-5)
    assert lm_loss(logits, labels, label_smoothing=eps, reduction="sum").item() == pytest.approx(sum(sums), abs=1e-5)
    mean = lm_loss(logits, labels, label_smoothing=eps).item()
    assert mean == pytest.approx(sum(sums) / count, abs=1e-5)  # mean over the 3 real targets


def test_default_smoothing_is_point_one():
    logits, labels = _example()
    torch.testing.assert_close(lm_loss(logits, labels), lm_loss(logits, labels, label_smoothing=0.1))


def test_shift_ignores_first_label_and_last_logit():
    logits, labels = _example()
    changed_logits = logits.clone()
    changed_logits[:, -1] = 1e3  # the last position predicts nothing
    changed_labels = labels.clone()
    changed_labels[:, 0] = 0  # the first token is never a target
    torch.testing.assert_close(lm_loss(changed_logits, changed_labels), lm_loss(logits, labels))


def test_uniform_logits_by_hand():
    vocab = 4
    logits = torch.zeros(1, 3, vocab)
    labels = torch.tensor([[0, 2, 1]])
    # Uniform prediction: every token costs log(V) whatever the smoothing.
    assert lm_loss(logits, labels, reduction="none").item() == pytest.approx(2 * math.log(vocab), abs=1e-6)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        lm_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        lm_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), reduction="avg")


def test_mask_prompt_and_padding():
    input_ids = torch.tensor(
        [[30522, 1037, 3861, 1997, 1037, 3899, 102, 0], [30522, 1037, 3861, 1997, 4937, 102, 0, 0]]
    )
    attention_mask = (input_ids != 0).long()
    labels = mask_prompt_and_padding(input_ids, attention_mask, prompt_length=4)
    assert labels.tolist() == [
        [-100, -100, -100, -100, 1037, 3899, 102, -100],
        [-100, -100, -100, -100, 4937, 102, -100, -100],
    ]
    assert input_ids[0, 0].item() == 30522  # input untouched
    no_prompt = mask_prompt_and_padding(input_ids, attention_mask)
    assert no_prompt[1].tolist() == [30522, 1037, 3861, 1997, 4937, 102, -100, -100]
    with pytest.raises(ValueError):
        mask_prompt_and_padding(input_ids, attention_mask[:, :3])
