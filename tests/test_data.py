"""data.py: the synthetic set, hub-layout loaders on local copies, collate."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
from machinery import hub
from conftest import write_hub_repo


# 10. and 11. the mixture file
def test_mixture_uses_mmeb_train_and_names_every_bad_entry(tmp_path, capsys):
    from test_data import mmeb_train_copy, moca_copy, write_mixture
    repo, images = mmeb_train_copy(tmp_path)
    mix = hub.load_mixture(write_mixture(tmp_path, {"ImageNet_1K": {"weight": 1.0, "num_samples": 50}}),
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
            hub.load_mixture(write_mixture(tmp_path, spec))
    dup = tmp_path / "dup.yaml"
    dup.write_text(f"A: {{path: {a}, weight: 1}}\nA: {{path: {a}, weight: 3}}\n")
    with pytest.raises(ValueError, match="A appear"):
        hub.load_mixture(str(dup))


def test_mixture_names_are_text_and_exponent_weights_numbers(tmp_path):
    """#41: keys 1 and '1' (two sources shown alike) and a `~:` key (a source named None) are one line;
    a weight written 1e-3 (text to PyYAML's YAML 1.1) is the number it reads as."""
    from test_data import moca_copy
    a = moca_copy(tmp_path, "A", 150)
    for text, said in ((f"1: {{path: {a}}}\n'1': {{path: {a}}}\n", r"source name 1 is YAML's int, not text: quote it \('1'\)"),
                       (f"~: {{path: {a}}}\n", r"a source is named ~ \(YAML's null\)")):
        (tmp_path / "m.yaml").write_text(text)
        with pytest.raises(ValueError, match=said):
            hub.read_mixture(str(tmp_path / "m.yaml"))
    (tmp_path / "w.yaml").write_text(f"A: {{path: {a}, weight: 1e-3}}\nB: {{path: {a}, weight: 2E+1}}\n")
    assert [e["weight"] for e in hub.read_mixture(str(tmp_path / "w.yaml")).values()] == [1e-3, 20.0]


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
    ds = hub.load_mmeb_train(repo, ["ImageNet_1K", "CIRR"], images, max_per_subset=3)
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
        hub.load_mmeb_train(repo, ["Nope"], images)
    bad = write_hub_repo(tmp_path / "bad", {"X": {"original": [dict(qry="a", pos_text="b")]}})
    with pytest.raises(ValueError, match=r"MMEB-train/X: missing column\(s\) \['qry_image_path'"):
        hub.load_mmeb_train(bad, ["X"], images)
    with pytest.raises(FileNotFoundError, match="the folder .*absent' does not exist"):   # not tried on the hub
        hub.load_mmeb_train(str(tmp_path / "absent"), ["X"], images)
    with pytest.raises(FileNotFoundError, match="cannot open 'nobody/absent'"):        # a hub id: tried, offline
        hub.load_mmeb_train("nobody/absent", ["X"], images)
    # a wrong image folder is found before training starts, with the count and the first rows
    with pytest.raises(FileNotFoundError, match=r"MMEB-train/CIRR: \d+ of \d+ images are missing, e.g. row 0 "
                                                r"(qry|pos)_image_path '.*elsewhere/.*png'"):
        hub.load_mmeb_train(repo, ["CIRR"], str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="row 0 refers to image .*give the folder"):
        hub.load_mmeb_train(repo, ["CIRR"], None)
    # one image deleted among many: named by its row
    (Path(images) / ds_image(repo)).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of \d+ images are missing, e.g. row \d+ \w+_image_path"):
        hub.load_mmeb_train(repo, ["CIRR"], images)


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
    ds = hub.load_colpali_train(repo)
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
    return write_hub_repo(root / name, {"default": {"original": rows}}, features=feats)


def write_mixture(tmp_path, sources):
    import yaml
    f = tmp_path / "mix.yaml"
    f.write_text(yaml.safe_dump(sources))
    return str(f)


def test_mixture_caps_take_the_first_rows_and_hold_out_the_end_of_that_prefix(tmp_path):
    """Official: split=f"original[:{num_samples}]", then the last 100 rows of that prefix held out."""
    a, c = moca_copy(tmp_path, "A", 300), moca_copy(tmp_path, "C", 400)
    mix = hub.load_mixture(write_mixture(tmp_path, {"A": {"weight": 1.0, "path": a},
                                                     "C": {"weight": 1.0, "num_samples": 250, "path": c}}), holdout=100)
    assert [list(s.rows) for s in mix.sources] == [list(range(200)), list(range(150))]
    assert [list(h.rows) for h in mix.heldout] == [list(range(200, 300)), list(range(150, 250))]
    assert mix.heldout[1][0]["qry_text"] == "C query 150" and mix.sources[1][149]["qry_text"] == "C query 149"
    assert mix.notes == [] and mix.negatives == [200 * 2 // 3, 150 * 2 // 3]   # row i has i % 3 negatives


def toy_mixture(tmp_path, sizes=(10, 100, 1000), weights=(1, 1, 2)):
    names = "ABC"[:len(sizes)]
    spec = {n: {"weight": w, "path": moca_copy(tmp_path, n, size + 1)} for n, size, w in zip(names, sizes, weights)}
    return hub.load_mixture(write_mixture(tmp_path, spec), holdout=1)


@pytest.mark.parametrize("world", [1, 2])
def test_mixture_shares_follow_the_weights_with_replacement(tmp_path, world):
    """Sizes 10 / 100 / 1,000, weights 1 / 1 / 2, 2,000 steps: every source's share of the examples is
    within 2 points of 25 / 25 / 50% on each rank (a source that runs out restarts), and batches are
    runs of one source."""
    mix = toy_mixture(tmp_path)
    for rank in range(world):
        order = data.MixtureBatches(mix, data.Order(16, world, rank, seed=0, start=0, steps=2000), run=4)
        k, rows = order.examples(np.arange(2000 * 16))
        shares = np.bincount(k, minlength=3) / len(k)
        assert np.abs(shares - [0.25, 0.25, 0.5]).max() < 0.02, shares
        assert order.seen(2000) == dict(zip("ABC", np.bincount(k, minlength=3).tolist()))
        runs = k.reshape(-1, 4)
        assert (runs == runs[:, :1]).all()                                   # runs of 4 from one source
        if world == 1:                # A (10 rows, ~8,000 draws) restarts pass after pass: each row as often
            a = np.bincount(rows[k == 0], minlength=10)
            assert a.max() - a.min() <= 1, a


def test_mixture_passes_never_repeat_a_row_across_ranks(tmp_path):
    """The stream split across 2 ranks: within one pass of a source no row is seen twice, on either rank;
    the next pass is a new order; a pure function of the step (a fresh sampler agrees)."""
    mix = toy_mixture(tmp_path)
    orders = [data.MixtureBatches(mix, data.Order(8, 2, rank, seed=5, start=0, steps=100), run=4) for rank in range(2)]
    # the global stream: rank r's run i is global run 2 i + r
    ex = [o.examples(np.arange(4000)) for o in orders]                     # 1000 runs each
    k = np.stack([e[0].reshape(-1, 4) for e in ex], 1).reshape(-1)
    rows = np.stack([e[1].reshape(-1, 4) for e in ex], 1).reshape(-1)
    for s, n in enumerate((10, 100, 1000)):
        seq = rows[k == s]
        passes = [seq[i:i + n] for i in range(0, len(seq) - n + 1, n)]
        assert passes and all(sorted(p.tolist()) == list(range(n)) for p in passes), s
        if len(passes) > 1:
            assert passes[0].tolist() != passes[1].tolist()                  # a new order each pass
    fresh = data.MixtureBatches(mix, data.Order(8, 2, 1, seed=5, start=0, steps=100), run=4)
    assert fresh.batch(77) == orders[1].batch(77)
    assert data.MixtureBatches(mix, data.Order(8, 2, 1, seed=6, start=0, steps=100), run=4).batch(77) != orders[1].batch(77)


def test_mixture_shuffle_buffer_mixes_runs_and_stays_a_function_of_the_step(tmp_path):
    """--shuffle-buffer N (the official shuffle(seed=42) after the split): every output is a different
    example of the rank's stream, drawn from at most N ahead; batches mix runs; shares still follow
    the weights; a fresh sampler gives the same batch at any step."""
    mix = toy_mixture(tmp_path)
    plain = data.MixtureBatches(mix, data.Order(16, 2, 1, seed=0, start=0, steps=2000), run=4)
    mixed = data.MixtureBatches(mix, data.Order(16, 2, 1, seed=0, start=0, steps=2000), run=4, buffer=100)
    pos = mixed._stream(np.arange(20000))
    assert len(set(pos.tolist())) == 20000 and (pos < np.arange(20000) + 100).all()   # no example twice, none ahead
    assert sorted(pos[:5000].tolist())[:4000] == list(range(4000))               # nothing left behind for long
    k = mixed.examples(np.arange(2000 * 16))[0]
    assert np.abs(np.bincount(k, minlength=3) / len(k) - [0.25, 0.25, 0.5]).max() < 0.02
    assert np.mean([len(set(b)) > 1 for b in k.reshape(-1, 16).tolist()]) > 0.9   # most batches mix sources
    assert np.mean([len(set(b)) > 1 for b in plain.examples(np.arange(2000 * 16))[0].reshape(-1, 4).tolist()]) == 0
    fresh = data.MixtureBatches(mix, data.Order(16, 2, 1, seed=0, start=0, steps=2000), run=4, buffer=100)
    assert fresh.batch(1234) == mixed.batch(1234) and fresh.seen(1500) == mixed.seen(1500)


def test_mixture_errors(tmp_path):
    a = moca_copy(tmp_path, "A", 150)
    with pytest.raises(ValueError, match="source A: unknown key.*weigth"):
        hub.load_mixture(write_mixture(tmp_path, {"A": {"path": a, "weigth": 2}}))
    with pytest.raises(ValueError, match="A: 150 rows, not more than the 200 held out"):
        hub.load_mixture(write_mixture(tmp_path, {"A": {"path": a}}), holdout=200)
    with pytest.raises(ValueError, match=r"A: 50 rows \(num_samples\), not more than the 100 held out"):
        hub.load_mixture(write_mixture(tmp_path, {"A": {"path": a, "num_samples": 50}}))
    # every source that cannot be read, in one line: a missing folder, a missing subset, no path, bad columns
    bad = write_hub_repo(tmp_path / "bad", {"default": {"original": [dict(question="q", answer="a")] * 3}})
    with pytest.raises(ValueError) as e:
        hub.load_mixture(write_mixture(tmp_path, {"A": {"path": a}, "B": {"path": str(tmp_path / "gone")},
                                                   "C": {"path": str(tmp_path / "gone")}, "ArxivQA": {"weight": 1.0},
                                                   "D": {"path": a, "subset": "nope"}, "E": {"path": bad}}))
    said = str(e.value)
    assert "\n" not in said and said.startswith("mixture ") and "5 of 6 source(s) cannot be read" in said
    assert "B, C: the folder" in said and "ArxivQA: no path" in said and "D: no subset 'nope'" in said
    assert "E: columns ['answer', 'question'] match no training layout" in said
    with pytest.raises(ValueError, match="mixture .*nope.yaml: cannot read it"):
        hub.load_mixture(str(tmp_path / "nope.yaml"))


def test_collate_k_negatives_repeat_the_last(tmp_path, tiny):
    """K = 2: a row with 2 negatives uses both, one with 1 repeats it, one with none is masked."""
    mix = hub.load_mixture(write_mixture(tmp_path, {"A": {"path": moca_copy(tmp_path, "A", 110)}}), holdout=100)
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
    x = hub.load_source(moca_copy(tmp_path / "x", "A", 120), None, "original", "x")
    y = hub.load_source(moca_copy(tmp_path / "y", "A", 130), None, "original", "y")
    assert (len(x), len(y)) == (120, 130)


def moca_official_copy(root, n=6):
    """A small copy laid out like the official run's MoCa_train_with_image: one config per source, split
    'original', images in the rows (a column only where the source has that image), neg_text a list,
    neg_image_0.., and the *_path columns the official loader ignores. CIRR: image query, image positive,
    image negatives (an empty first negative text, as VisDial's); DocVQA: image query, text answers, text
    negatives; N24News: no negative columns at all."""
    import datasets
    img = lambda i: Image.new("RGB", (32 + i, 40), (40 * i % 255, 90, 0))   # noqa: E731
    s, im, seq = datasets.Value("string"), datasets.Image(), datasets.Sequence(datasets.Value("string"))
    cirr = [dict(qry=f"<|image_1|>\nGiven an image, find a similar one {i}\n", qry_image_path=f"cirr/{i}.png",
                 qry_image=img(i), pos_text="<|image_1|>\nRepresent the given image.\n", pos_image_path="x.png",
                 pos_image=img(i + 1), neg_text=["", "<|image_1|>\nRepresent the given image.\n"],
                 neg_image_path="y.png", neg_image_0=img(i + 2), neg_image_1=img(i + 3)) for i in range(n)]
    doc = [dict(qry=f"<|image_1|>\nRepresent the given image with the following question: q{i}\n",
                qry_image_path="d.png", qry_image=img(i), pos_text=f"answer {i}", pos_image_path="",
                neg_text=[f"wrong {i}", f"also wrong {i}"], neg_image_path="") for i in range(n)]
    news = [dict(qry="<|image_1|>\nWhat news is this?\n", qry_image=img(i), pos_text=f"news {i}") for i in range(n)]
    feats = {"CIRR": datasets.Features(dict(qry=s, qry_image_path=s, qry_image=im, pos_text=s, pos_image_path=s,
                                            pos_image=im, neg_text=seq, neg_image_path=s, neg_image_0=im,
                                            neg_image_1=im)),
             "DocVQA": datasets.Features(dict(qry=s, qry_image_path=s, qry_image=im, pos_text=s, pos_image_path=s,
                                              neg_text=seq, neg_image_path=s)),
             "N24News": datasets.Features(dict(qry=s, qry_image=im, pos_text=s))}
    return write_hub_repo(root / "MoCa_train_with_image", {"CIRR": {"original": cirr}, "DocVQA": {"original": doc},
                                                          "N24News": {"original": news}}, features=feats)


def test_moca_official_layout_is_read_as_the_official_collator_reads_it(tmp_path, tiny):
    repo = moca_official_copy(tmp_path)
    mix = hub.load_mixture(write_mixture(tmp_path, {n: {"weight": 1.0, "num_samples": 5, "path": repo}
                                                     for n in ("CIRR", "DocVQA", "N24News")}), holdout=1)
    assert mix.names == ["CIRR", "DocVQA", "N24News"] and [len(s) for s in mix.sources] == [4, 4, 4]
    assert mix.negatives == [4, 4, 0]                               # N24News: no hard negatives in this copy
    cirr, doc, news = (mix[(k, 1)] for k in range(3))
    # "<|image_1|>\n" dropped, images from the rows (no --images: the *_path columns are not read)
    assert cirr["qry_text"] == "Given an image, find a similar one 1\n" and cirr["qry_image"].size == (33, 40)
    assert cirr["pos_text"] == "Represent the given image.\n" and cirr["pos_image"].size == (34, 40)
    assert [(t, im.size) for t, im in cirr["negs"]] == [("", (35, 40)), ("Represent the given image.\n", (36, 40))]
    assert doc["pos_image"] is None and doc["negs"] == [("wrong 1", None), ("also wrong 1", None)]
    assert news["negs"] == [] and news["qry_text"] == "What news is this?\n"
    # one hard negative per query (K = 1): the first of each list; N24News's query is masked
    q, c, neg_mask = data.collate([cirr, doc, news], tiny.processor, num_negatives=1)
    assert neg_mask[:, 0].tolist() == [True, True, False] and c["input_ids"].shape[0] == 6
    img_rows = (c["input_ids"] == tiny.backbone.config.image_token_id).any(1).tolist()
    assert img_rows == [True, False, False, True, False, False]    # CIRR's positive and its image negative
    texts = tiny.processor.tokenizer.batch_decode(c["input_ids"][3:5], skip_special_tokens=True)
    assert texts[0].endswith("Describe the image.") and texts[1].endswith("wrong 1")
