"""data.py: the synthetic set, hub-layout loaders on local copies, collate."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
from conftest import write_hub_repo


def test_synthetic_is_deterministic_and_seeded():
    a, b = data.SyntheticPairs(50, seed=1), data.SyntheticPairs(50, seed=1)
    for i in (0, 7, 49):
        x, y = a[i], b[i]
        assert x["qry_text"] == y["qry_text"] and x["pos_text"] == y["pos_text"]
        for k in ("qry_image", "pos_image", "neg_image"):
            assert (x[k] is None) == (y[k] is None)
            if x[k] is not None:
                assert np.array_equal(np.asarray(x[k]), np.asarray(y[k]))
    other = data.SyntheticPairs(50, seed=2)
    assert [a[i]["qry_text"] + a[i]["pos_text"] for i in range(20)] != \
        [other[i]["qry_text"] + other[i]["pos_text"] for i in range(20)]
    with pytest.raises(IndexError):
        a[50]


def test_synthetic_both_directions_and_hard_negatives():
    ds = data.SyntheticPairs(200)
    t2i = [ds[i] for i in range(200) if ds[i]["qry_image"] is None]
    assert 60 < len(t2i) < 140  # about half each way
    for i in range(30):
        e = ds[i]
        if e["qry_image"] is None:   # text -> image: negative is an image
            assert e["neg_image"] is not None and e["pos_image"] is not None
        else:                        # image -> text: negative is a caption differing from the positive
            assert e["neg_text"] and e["neg_text"] != e["pos_text"]


def test_variant_changes_exactly_one_thing():
    import random
    rng = random.Random(0)
    for _ in range(200):
        s = data.make_scene(rng)
        v = data.variant(s, rng)
        assert v != s
        changed = set(s) ^ set(v)
        assert len(changed) in (2, 4)   # one object replaced (2), or a colour swap between two (4)


def test_splits_are_disjoint():
    train = {data.caption(data.synthetic_scene("train", i)) for i in range(3000)}
    ev = {data.caption(data.synthetic_scene("eval", i)) for i in range(300)}
    assert len(ev) > 250 and not (train & ev)


def test_synthetic_eval_tasks():
    tasks = data.synthetic_eval(n_scenes=20, n_variants=3)
    t2i, i2t = tasks["t2i"], tasks["i2t"]
    assert len(t2i["queries"]) == 20 and len(t2i["corpus"]) == 80
    for q, rel in t2i["qrels"].items():
        (doc, r), = rel.items()
        assert r == 1 and doc in t2i["corpus"]
        assert t2i["queries"][q][0] == i2t["corpus"][doc][0]  # the query caption is the doc's caption


def test_render_draws_each_object_in_its_cell():
    scene = ((0, "red"), (8, "blue"))
    im = np.asarray(data.render(scene))
    assert tuple(im[14, 14]) == data.COLOURS["red"] and tuple(im[3, 3]) == data.COLOURS["red"]
    assert tuple(im[70, 70]) == data.COLOURS["blue"]
    assert tuple(im[42, 42]) == (20, 20, 20)  # the empty centre


# -- MMEB-train / colpali-train on local copies laid out like the hub repos ----------------

def mmeb_train_copy(tmp_path):
    images = tmp_path / "images"
    (images / "cls").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(images / "cls" / f"{i}.png")
    rows_a = [dict(qry=f"<|image_1|>\nRepresent the image {i}", qry_image_path=f"cls/{i}.png",
                   pos_text=f"label {i}", pos_image_path="") for i in range(4)]
    rows_b = [dict(qry=f"find {i}", qry_image_path="", pos_text="", pos_image_path=f"cls/{i}.png",
                   neg_text="", neg_image_path=f"cls/{(i + 1) % 4}.png") for i in range(3)]
    repo = write_hub_repo(tmp_path / "MMEB-train", {"ImageNet_1K": {"original": rows_a},
                                                     "CIRR": {"original": rows_b}})
    return repo, str(images)


def test_mmeb_train_local_copy(tmp_path, tiny):
    repo, images = mmeb_train_copy(tmp_path)
    ds = data.load_mmeb_train(repo, ["ImageNet_1K", "CIRR"], images, max_per_subset=3, seed=0)
    assert len(ds) == 6
    rows = [ds[i] for i in range(6)]
    again = data.load_mmeb_train(repo, ["ImageNet_1K", "CIRR"], images, max_per_subset=3, seed=0)
    assert [r["source"] for r in rows] == [again[i]["source"] for i in range(6)]   # seeded interleave
    assert {r["source"].split(" row")[0] for r in rows} == {"MMEB-train/ImageNet_1K", "MMEB-train/CIRR"}
    cirr = [r for r in rows if "CIRR" in r["source"]]
    assert all(r["neg_image"].endswith(".png") and r["neg_text"] == "" for r in cirr)
    imnet = [r for r in rows if "ImageNet" in r["source"]]
    assert all(r["neg_text"] is None and r["neg_image"] is None for r in imnet)
    assert imnet[0]["qry_image"].startswith(images)
    q, c, neg_mask = data.collate(rows, tiny.processor)
    assert q["input_ids"].shape[0] == 6 and c["input_ids"].shape[0] == 12
    assert neg_mask[:, 0].tolist() == ["CIRR" in r["source"] for r in rows]
    # the MMEB image token became Qwen's placeholder: one image per ImageNet query
    assert (q["input_ids"] == tiny.backbone.config.image_token_id).any(1).sum() == len(imnet)


def test_mmeb_train_errors(tmp_path, tiny):
    repo, images = mmeb_train_copy(tmp_path)
    with pytest.raises(ValueError, match="no subset 'Nope'.*CIRR"):
        data.load_mmeb_train(repo, ["Nope"], images)
    bad = write_hub_repo(tmp_path / "bad", {"X": {"original": [dict(qry="a", pos_text="b")]}})
    with pytest.raises(ValueError, match=r"MMEB-train/X: missing column\(s\) \['qry_image_path'"):
        data.load_mmeb_train(bad, ["X"], images)
    with pytest.raises(FileNotFoundError, match="the folder .*absent' does not exist"):   # not tried on the hub
        data.load_mmeb_train(str(tmp_path / "absent"), ["X"], images)
    with pytest.raises(FileNotFoundError, match="cannot open 'nobody/absent'"):        # a hub id: tried, offline
        data.load_mmeb_train("nobody/absent", ["X"], images)
    # a wrong image folder is found before training starts, with the count and the first rows
    with pytest.raises(FileNotFoundError, match=r"MMEB-train/CIRR: \d+ of \d+ images are missing, e.g. row 0 "
                                                r"(qry|pos)_image '.*elsewhere/.*png'"):
        data.load_mmeb_train(repo, ["CIRR"], str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="row 0 refers to image .*give the folder"):
        data.load_mmeb_train(repo, ["CIRR"], None)
    # one image deleted among many: named by its row
    (Path(images) / ds_image(repo)).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of \d+ images are missing, e.g. row \d+ \w+_image"):
        data.load_mmeb_train(repo, ["CIRR"], images)


def ds_image(repo):
    """The first image path named in the CIRR subset of a local MMEB-train copy."""
    import datasets
    return datasets.load_dataset(repo, "CIRR", split="original")["pos_image_path"][0]


def test_colpali_train_local_copy(tmp_path, tiny):
    import datasets
    feats = datasets.Features({"query": datasets.Value("string"), "image": datasets.Image()})
    rows = [dict(query=f"what is on page {i}?", image=Image.new("RGB", (40, 60), (0, 40 * i, 0)))
            for i in range(3)]
    repo = write_hub_repo(tmp_path / "colpali", {"default": {"train": rows}}, features=feats)
    ds = data.load_colpali_train(repo)
    e = ds[1]
    assert e["qry_text"] == "what is on page 1?" and e["neg_text"] is None
    assert isinstance(e["pos_image"], Image.Image) and e["pos_image"].size == (40, 60)
    q, c, neg_mask = data.collate([ds[i] for i in range(3)], tiny.processor)
    assert neg_mask is None and c["input_ids"].shape[0] == 3 and c["image_grid_thw"].shape == (3, 3)
