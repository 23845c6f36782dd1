"""The training objectives wired to the model: sharing, momentum, masking, multi-positives."""

import pytest
import torch

from openblip import BlipModel, preset
from openblip.tokenizer import BlipTokenizer
from openblip.train.tasks import CaptionTask, PretrainTask, RetrievalTask

CAPTIONS = ["a dog on the grass", "a red car", "two cats sleeping", "a plane in the sky"]


def _pretrain(queue_size=16):
    torch.manual_seed(0)
    return PretrainTask(BlipModel(preset("tiny")), BlipTokenizer.default(), queue_size=queue_size)


def test_encoder_and_decoder_share_all_but_self_attention():
    task = _pretrain()
    enc, dec = task.model.text_encoder, task.model.text_decoder.bert
    enc_params = dict(enc.named_parameters(remove_duplicate=False))
    dec_params = dict(dec.named_parameters(remove_duplicate=False))
    assert enc_params.keys() == dec_params.keys()
    for name, p in enc_params.items():
        shared = p is dec_params[name]
        assert shared == (".attention." not in name), name
    # Cross-attention and embeddings are shared; self-attention is not.
    assert enc.embeddings.word_embeddings.weight is dec.embeddings.word_embeddings.weight
    assert enc.encoder.layer[1].crossattention.self.key.weight is dec.encoder.layer[1].crossattention.self.key.weight
    assert enc.encoder.layer[1].attention.self.key.weight is not dec.encoder.layer[1].attention.self.key.weight
    # The shared parameters are counted (and optimised) once.
    unique = {id(p) for p in task.model.parameters()}
    assert len(unique) == len(list(task.model.parameters()))


def test_losses_are_finite_and_everything_trainable_gets_a_gradient():
    task = _pretrain()
    out = task(torch.randn(4, 3, 64, 64), CAPTIONS, step=0, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_lm"}
    assert torch.allclose(out["loss"], out["loss_itc"] + out["loss_itm"] + out["loss_lm"])
    out["loss"].backward()
    trainable = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable)
    assert all(not n.startswith("contrast.") for n, _ in trainable), "momentum encoders must be frozen"


def test_momentum_encoders_follow_the_online_model_by_ema():
    task = _pretrain()
    online = task.model.vision_proj.weight
    teacher = task.contrast.vision_proj_m.weight
    assert torch.equal(online, teacher)  # initialised by copy
    with torch.no_grad():
        online.add_(1.0)
    before = teacher.clone()
    task.contrast.teacher(task.model, torch.randn(2, 3, 64, 64), *_ids(task, 2))
    assert torch.allclose(teacher, 0.995 * before + 0.005 * online, atol=1e-6)


def _ids(task, n):
    return task.tokens(CAPTIONS[:n], "cls", 30)


def test_queue_receives_the_momentum_features_of_each_batch():
    task = _pretrain(queue_size=8)
    gen = torch.Generator().manual_seed(0)
    task(torch.randn(4, 3, 64, 64), CAPTIONS, step=0, generator=gen)
    assert int(task.contrast.queue.ptr) == 4
    task(torch.randn(4, 3, 64, 64), CAPTIONS, step=1, generator=gen)
    task(torch.randn(4, 3, 64, 64), CAPTIONS, step=2, generator=gen)
    assert int(task.contrast.queue.ptr) == 4  # 12 features into 8 slots wrapped around
    norms = task.contrast.queue.text_queue.norm(dim=0)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_temperature_is_clamped_each_step():
    task = _pretrain()
    with torch.no_grad():
        task.model.temp.fill_(5.0)
    task(torch.randn(4, 3, 64, 64), CAPTIONS, step=0)
    assert float(task.model.temp.detach()) <= 0.5


def test_caption_task_masks_the_prompt_and_padding():
    torch.manual_seed(0)
    model = BlipModel(preset("tiny", task="caption", has_text_encoder=False, has_itc=False, has_itm=False))
    task = CaptionTask(model, BlipTokenizer.default(), prompt="a picture of ")
    assert task.prompt_length == 4
    pixels = torch.randn(2, 3, 64, 64)
    base = task(pixels, ["a dog", "a very long caption about a dog"], step=0)["loss"]
    # Changing what the prompt would predict cannot matter: the prompt is masked. Shown by
    # comparing with a task whose prompt differs only in tokens that are never targets.
    ids, _ = task.tokens(["a picture of a dog"], "dec", 40)
    assert ids[0, :4].tolist() == [30522, 1037, 3861, 1997]
    assert torch.isfinite(base)


def test_retrieval_task_needs_ids_and_treats_same_image_captions_as_positives():
    torch.manual_seed(0)
    model = BlipModel(preset("tiny", task="retrieval", has_text_decoder=False))
    task = RetrievalTask(model, BlipTokenizer.default(), queue_size=16)
    pixels = torch.randn(4, 3, 64, 64)
    try:
        task(pixels, CAPTIONS, step=0)
        raise AssertionError("expected a ValueError without idx")
    except ValueError as exc:
        assert "image ids" in str(exc)
    out = task(pixels, CAPTIONS, step=0, idx=torch.tensor([7, 7, 8, 9]), generator=torch.Generator().manual_seed(1))
    assert set(out) == {"loss", "loss_itc", "loss_itm"}
    assert torch.isfinite(out["loss"])
    assert task.contrast.queue.idx_queue[0, :4].tolist() == [7, 7, 8, 9]


def test_pretraining_with_ids_never_draws_a_same_id_negative(monkeypatch):
    from openblip.train import tasks

    torch.manual_seed(0)
    task = PretrainTask(BlipModel(preset("tiny")), BlipTokenizer.default(), queue_size=16, with_idx=True)
    pixels = torch.randn(4, 3, 64, 64)
    with pytest.raises(ValueError, match="needs their ids"):
        task(pixels, CAPTIONS, step=0)
    drawn = []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        drawn.append((kwargs["idx"], out))
        return out

    real = tasks.sample_hard_negatives
    monkeypatch.setattr(tasks, "sample_hard_negatives", spy)
    idx = torch.tensor([7, 7, 8, 8])
    for step in range(6):
        out = task(pixels, CAPTIONS, step=step, idx=idx, generator=torch.Generator().manual_seed(step))
        assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_lm"} and torch.isfinite(out["loss"])
    for ids, (neg_img, neg_txt) in drawn:
        assert ids.tolist() == [7, 7, 8, 8]
        assert (ids[neg_img] != ids).all() and (ids[neg_txt] != ids).all()
    assert task.contrast.queue.idx_queue[0, :8].tolist() == [7, 7, 8, 8, 7, 7, 8, 8]


def test_lm_loss_on_scored_positions_equals_the_full_lm_loss():
    from openblip.losses import lm_loss, mask_prompt_and_padding

    task = _pretrain()
    ids, mask = task.tokens(["a dog", "a much longer caption with more words"], "dec", 30, "max_length")
    image = task.model.encode_image(torch.randn(2, 3, 64, 64))
    labels = mask_prompt_and_padding(ids, mask, 1)
    fast = task.lm_loss(ids, mask, image, labels, 0.1)
    logits, _ = task.model.decode(ids, mask, states=image)
    assert torch.allclose(fast, lm_loss(logits, labels, label_smoothing=0.1), atol=1e-5)


def _fake_batches(sizes):
    return [{"text": ["t"] * n, "next_position": 4 * (i + 1), "skipped": {"bad_image": 4 - n}}
            for i, n in enumerate(sizes)]


class _FakeData:
    def set_epoch(self, epoch, start):
        self.epoch, self.start = epoch, start


def test_batches_are_skipped_together_when_another_rank_has_none():
    from collections import Counter

    from openblip.train.loop import DataState, _batches

    # This rank: 4, 4, 0, 4 samples; the other rank: its 2nd batch is empty.
    other_rank_ok = iter([True, False, True, True])
    state, skipped = DataState(), Counter()
    stream = _batches(_FakeData(), lambda d: _fake_batches([4, 4, 0, 4]), state, skipped,
                      lambda ok: ok and next(other_rank_ok))
    got = [next(stream)["next_position"] for _ in range(2)]
    assert got == [4, 16]  # batch 2 skipped for the other rank, batch 3 for this one
    assert skipped["other_rank_batch_unreadable"] == 4 and skipped["bad_image"] == 4


def test_a_pass_without_any_readable_sample_is_an_error_not_a_loop():
    from collections import Counter

    from openblip.train.loop import DataState, _batches

    stream = _batches(_FakeData(), lambda d: _fake_batches([0, 0]), DataState(), Counter())
    with pytest.raises(RuntimeError, match="no readable sample"):
        next(stream)
