"""Training straight from a BLIP JSON annotation list or a folder with a CSV of captions."""

import csv
import json

from helpers_data import shape_image

from openblip.data.convert import annotations_to_shards
from openblip.data.shards import expand_urls, iter_samples
from openblip.train.config import load_train_config
from openblip.train.run import train


def _images(folder, n=6):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        color, shape = ("red", "blue", "green")[i % 3], ("square", "circle")[i % 2]
        shape_image(color, shape).save(folder / f"img{i}.png")
        names.append((f"img{i}.png", f"a {color} {shape}"))
    return names


def test_json_list_converts_to_shards_with_all_captions_and_skips_bad_entries(tmp_path):
    names = _images(tmp_path / "images")
    entries = [{"image": f"images/{n}", "caption": [c, c + " on white"]} for n, c in names]
    entries += [{"image": "images/missing.png", "caption": "gone"}, {"image": "images/img0.png", "caption": ""}]
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    pattern = annotations_to_shards(tmp_path / "ann.json", tmp_path / "out", per_shard=4)
    samples = [s for paths in expand_urls(pattern) for p in paths for s in iter_samples(p)]
    assert len(samples) == 6 and len(expand_urls(pattern)[0]) == 2
    assert samples[0]["txt"].split("\n") == ["a red square", "a red square on white"]
    assert samples[0]["png"] == (tmp_path / "images/img0.png").read_bytes()
    stats = json.loads((tmp_path / "out/shards.json").read_text())
    assert stats["skipped"] == {"missing_image": 1, "no_caption": 1}
    assert annotations_to_shards(tmp_path / "ann.json", tmp_path / "out") == pattern  # reused


def test_pretrain_from_an_image_folder_with_a_csv(tmp_path):
    names = _images(tmp_path / "photos", n=8)
    with open(tmp_path / "photos/captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(names)
    cfg = load_train_config("tiny").replace(max_steps=2, batch_size=4, queue_size=8, num_workers=0, save_every=2)
    last = train(cfg, str(tmp_path / "photos"), tmp_path / "run", progress=False)
    assert last["loss"] > 0
    assert (tmp_path / "run/data/source-0/shards.json").is_file()
    assert (tmp_path / "run/model.safetensors").is_file()
