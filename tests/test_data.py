"""data.py: the synthetic set, hub-layout loaders on local copies, collate."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
from conftest import write_hub_repo


# 10. and 11. the mixture file
def test_mixture_uses_mmeb_train_and_names_every_bad_entry(tmp_path, capsys):
    from test_data import mmeb_train_copy, moca_copy, write_mixture
    repo, images = mmeb_train_copy(tmp_path)
    mix = data.load_mixture(write_mixture(tmp_path, {"ImageNet_1K": {"weight": 1.0, "num_samples": 50}}),
                            images, holdout=1, mmeb_train=repo)
    assert mix.names == ["ImageNet_1K"] and len(mix.sources[0]) == 3
    assert mix.notes == ["mixture source ImageNet_1K: num_samples 50 is more than its 3 training rows (after 1 held "
                         "out): all of them are used"]
    a = moca_copy(tmp_path, "A", 150)
    for spec, said in (({"A": 1.0}, r"source A: expected \{weight"), ({"A": a}, "source A: expected"),
                       ({"A": [1, 2]}, "source A: expected"), ({"A": {"path": 123}}, "source A: path must be a string"),
                       ({"A": {"path": a, "weight": float("inf")}}, "weight must be a finite number > 0, got inf"),
                       ({"A": {"path": a, "weight": "heavy"}}, "weight must be a finite number > 0, got 'heavy'"),
                       ({"A": {"path": a, "weight": 1e308}, "B": {"path": a, "weight": 1e308}}, "add up to more than"),
                       ({"A": {"path": a, "num_samples": 2.7}}, "num_samples must be a whole number >= 1, got 2.7")):
        with pytest.raises(ValueError, match=said):
            data.load_mixture(write_mixture(tmp_path, spec))
    dup = tmp_path / "dup.yaml"
    dup.write_text(f"A: {{path: {a}, weight: 1}}\nA: {{path: {a}, weight: 3}}\n")
    with pytest.raises(ValueError, match="A appear"):
        data.load_mixture(str(dup))


def test_synthetic_is_deterministic_and_seeded():
    a, b = data.SyntheticPairs(50, seed=1), data.SyntheticPairs(50, seed=1)
    for i in (0, 7, 49):
        x, y = a[i], b[i]
        assert x["qry_text"] == y["qry_text"] and x["pos_text"] == y["pos_text"]
        for u, v in [(x["qry_image"], y["qry_image"]), (x["pos_image"], y["pos_image"]),
                     (x["negs"][0][1], y["negs"][0][1])]:
            assert (u is None) == (v is None)
            if u is not None:
                assert np.array_equal(np.asarray(u), np.asarray(v))
        assert x["negs"][0][0] == y["negs"][0][0]
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
        [(neg_text, neg_image)] = e["negs"]
        if e["qry_image"] is None:   # text -> image: negative is an image
            assert neg_image is not None and e["pos_image"] is not None
        else:                        # image -> text: negative is a caption differing from the positive
            assert neg_text and neg_text != e["pos_text"]


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
    ds = data.load_mmeb_train(repo, ["ImageNet_1K", "CIRR"], images, max_per_subset=3)
    assert len(ds) == 6
    rows = [ds[i] for i in range(6)]                   # train.py's sampler shuffles (by seed and step)
    assert [r["source"] for r in rows] == [f"MMEB-train/ImageNet_1K row {i}" for i in range(3)] + \
        [f"MMEB-train/CIRR row {i}" for i in range(3)]
    cirr = [r for r in rows if "CIRR" in r["source"]]
    assert all(len(r["negs"]) == 1 and r["negs"][0][1].endswith(".png") and r["negs"][0][0] == "" for r in cirr)
    imnet = [r for r in rows if "ImageNet" in r["source"]]
    assert all(r["negs"] == [] for r in imnet)
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
                                                r"(qry|pos)_image_path '.*elsewhere/.*png'"):
        data.load_mmeb_train(repo, ["CIRR"], str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="row 0 refers to image .*give the folder"):
        data.load_mmeb_train(repo, ["CIRR"], None)
    # one image deleted among many: named by its row
    (Path(images) / ds_image(repo)).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of \d+ images are missing, e.g. row \d+ \w+_image_path"):
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
    assert e["qry_text"] == "what is on page 1?" and e["negs"] == []
    assert isinstance(e["pos_image"], Image.Image) and e["pos_image"].size == (40, 60)
    q, c, neg_mask = data.collate([ds[i] for i in range(3)], tiny.processor)
    assert neg_mask is None and c["input_ids"].shape[0] == 3 and c["image_grid_thw"].shape == (3, 3)


# -- the mixture ----------------------------------------------------------------

def moca_copy(root, name, n, K=2, in_row_images=True):
    """A local source in the MoCa layout: qry, qry_image, pos_text, pos_image, neg_text (list),
    neg_image_0..K-1; images in the rows. Row i has i % (K + 1) negatives."""
    import datasets
    img = datasets.Image() if in_row_images else datasets.Value("string")
    feats = datasets.Features({"qry": datasets.Value("string"), "qry_image": img, "pos_text": datasets.Value("string"),
                               "pos_image": img, "neg_text": datasets.Sequence(datasets.Value("string")),
                               **{f"neg_image_{k}": img for k in range(K)}})
    rows = [dict(qry=f"{name} query {i}", qry_image=None, pos_text=f"{name} doc {i}", pos_image=None,
                 neg_text=[f"{name} neg {i}.{k}" for k in range(i % (K + 1))],
                 **{f"neg_image_{k}": None for k in range(K)}) for i in range(n)]
    return write_hub_repo(root / name, {"default": {"train": rows}}, features=feats)


def write_mixture(tmp_path, sources):
    import yaml
    f = tmp_path / "mix.yaml"
    f.write_text(yaml.safe_dump(sources))
    return str(f)


def test_mixture_weights_runs_caps_and_holdout(tmp_path):
    a, b, c = (moca_copy(tmp_path, n, rows) for n, rows in (("A", 3000), ("B", 3000), ("C", 400)))
    mix = data.load_mixture(write_mixture(tmp_path, {"A": {"weight": 1.0, "path": a}, "B": {"weight": 3.0, "path": b},
                                                     "C": {"weight": 1.0, "num_samples": 150, "path": c}}),
                            holdout=100, seed=0)
    assert [len(s) for s in mix.sources] == [2900, 2900, 150] and [len(h) for h in mix.heldout] == [100] * 3
    assert list(mix.heldout[0].rows) == list(range(2900, 3000))      # the last 100 rows of each source
    assert list(mix.heldout[2].rows) == list(range(300, 400)) and all(r < 300 for r in mix.sources[2].rows)
    src, rows = mix.epoch(seed=0, rank=0, epoch=0, run=32)
    assert len(src) == len(mix) and sorted(zip(src.tolist(), rows.tolist())) == \
        sorted((s, r) for s in range(3) for r in range(len(mix.sources[s])))       # every example once
    starts = [0] + [i for i in range(1, len(src)) if src[i] != src[i - 1]]
    runs = [j - i for i, j in zip(starts, starts[1:] + [len(src)])]
    # runs of exactly 32 from one source, but where a source ran out (its last, shorter run)
    sizes = [len(s) for s in mix.sources]
    short = [(src[i], r) for i, r in zip(starts, runs) if r % 32]
    assert len(short) <= 3 and all(r % 32 == sizes[s] % 32 for s, r in short)
    # while all three are live, sources are drawn in proportion to weight (1 : 3 : 1), within 3 points
    first = src[:2000].tolist()
    for s, w in ((0, 0.2), (1, 0.6), (2, 0.2)):
        if s == 2:
            continue                                    # C (150 rows) is exhausted early by design
        assert abs(first.count(s) / 2000 - w / 0.8 * (1 - first.count(2) / 2000)) < 0.03, (s, first.count(s))
    other = mix.epoch(seed=0, rank=1, epoch=0, run=32)[0]
    assert other.tolist() != src.tolist()               # each rank its own order
    assert mix.epoch(0, 0, 0, 32)[0].tolist() == src.tolist()        # a pure function of (seed, rank, epoch)


def test_mixture_proportions_over_2000_examples(tmp_path):
    """Sources with room to spare: drawn in proportion to weight, within 3 points over 2,000."""
    paths = {n: moca_copy(tmp_path, n, 2200) for n in ("A", "B", "C")}
    mix = data.load_mixture(write_mixture(tmp_path, {"A": {"weight": 1.0, "path": paths["A"]},
                                                     "B": {"weight": 2.0, "path": paths["B"]},
                                                     "C": {"weight": 5.0, "path": paths["C"]}}), holdout=100)
    src = mix.epoch(seed=3, rank=0, epoch=0, run=8)[0][:2000].tolist()
    for s, w in enumerate((1 / 8, 2 / 8, 5 / 8)):
        assert abs(src.count(s) / 2000 - w) < 0.03, (s, src.count(s))


def test_mixture_errors(tmp_path):
    a = moca_copy(tmp_path, "A", 150)
    with pytest.raises(ValueError, match="no path for ArxivQA"):
        data.load_mixture(write_mixture(tmp_path, {"A": {"path": a}, "ArxivQA": {"weight": 1.0}}))
    with pytest.raises(ValueError, match="source A: unknown key.*weigth"):
        data.load_mixture(write_mixture(tmp_path, {"A": {"path": a, "weigth": 2}}))
    with pytest.raises(ValueError, match="source A has 150 rows, not more than the 200 held out"):
        data.load_mixture(write_mixture(tmp_path, {"A": {"path": a}}), holdout=200)
    with pytest.raises(ValueError, match="mixture .*nope.yaml: cannot read it"):
        data.load_mixture(str(tmp_path / "nope.yaml"))


def test_collate_k_negatives_repeat_the_last(tmp_path, tiny):
    """K = 2: a row with 2 negatives uses both, one with 1 repeats it, one with none is masked."""
    mix = data.load_mixture(write_mixture(tmp_path, {"A": {"path": moca_copy(tmp_path, "A", 110)}}), holdout=100)
    rows = [mix[(0, i)] for i in range(3)]                  # rows 0, 1, 2 have 0, 1, 2 negatives
    assert [len(r["negs"]) for r in rows] == [0, 1, 2]
    q, c, neg_mask = data.collate(rows, tiny.processor, num_negatives=2)
    assert neg_mask.tolist() == [[False, False], [True, True], [True, True]]
    texts = tiny.processor.tokenizer.batch_decode(c["input_ids"], skip_special_tokens=True)
    cands = [t.split("user\n")[-1] for t in texts]
    assert cands == ["A doc 0", "A doc 1", "A doc 2", "A doc 0", "A doc 0", "A neg 1.0", "A neg 1.0",
                     "A neg 2.0", "A neg 2.1"]


def test_two_local_copies_with_one_name_are_not_confused(tmp_path):
    """datasets caches a local folder by its name alone; the loaders key the cache by path and files."""
    x = data.load_source(moca_copy(tmp_path / "x", "A", 120), None, "train", "x")
    y = data.load_source(moca_copy(tmp_path / "y", "A", 130), None, "train", "y")
    assert (len(x), len(y)) == (120, 130)
