"""evaluate.py: metrics on hand-worked cases, one encoding for all budgets, benchmark layouts."""
import json
import math
import os
import re
import types

import pytest
import torch
from PIL import Image

import data
from machinery import hub
import evaluate
from metaembed import ScoringOptions
from maxsim import maxsim
from conftest import write_hub_repo


# 8. held-out P@1 when candidates repeat
def test_heldout_identical_candidates_count_once():
    rows = [dict(qry_text=f"is this {i} fine?", qry_image=None, pos_text="yes" if i % 3 else "no", pos_image=None,
                 negs=[], source=f"row {i}") for i in range(9)]
    task = evaluate.heldout_task(rows)
    assert task["corpus"] == {0: ("no", None), 1: ("yes", None)}
    assert task["qrels"] == {i: {1 if i % 3 else 0: 1} for i in range(9)}
    img = [Image.new("RGB", (30, 30), "red"), Image.new("RGB", (30, 30), "red"), Image.new("RGB", (30, 30), "blue")]
    task = evaluate.heldout_task([dict(qry_text=str(i), qry_image=None, pos_text="", pos_image=im, negs=[], source="")
                               for i, im in enumerate(img)])
    assert len(task["corpus"]) == 2 and task["qrels"][0] == task["qrels"][1] != task["qrels"][2]


# 4. --index-dir shared by two runs
def test_runs_sharing_an_index_dir_get_their_own_folders(tmp_path):
    argv = ["--backbone", "tiny", "--synthetic-scenes", "4", "--budgets", "1,64", "--index-dir", str(tmp_path / "idx")]
    one, two = evaluate.main(argv), evaluate.main(argv)
    assert one["index_dir"] != two["index_dir"] and os.path.dirname(one["index_dir"]) == str(tmp_path / "idx")
    for run in (one, two):
        assert sorted(os.listdir(run["index_dir"])) == ["i2t", "t2i"]
    assert one["tasks"]["t2i"]["16x64"]["P@1"] == two["tasks"]["t2i"]["16x64"]["P@1"]


# 5. two ViDoRe data sets whose folders share a name
def test_vidore_sets_with_one_folder_name_are_two_columns(tmp_path, tiny_checkpoint):
    import datasets
    feats = datasets.Features({"query": datasets.Value("string"), "image": datasets.Image(),
                               "image_filename": datasets.Value("string")})
    for parent, colour in (("a", "red"), ("b", "blue")):
        rows = [dict(query=f"{parent} q{i}", image=Image.new("RGB", (28, 28), colour), image_filename=f"p{i}.png")
                for i in range(3)]
        write_hub_repo(tmp_path / parent / "docvqa", {"default": {"test": rows}}, features=feats)
    res = evaluate.main(["--checkpoint", tiny_checkpoint, "--benchmark", "vidore", "--budgets", "1",
                         "--vidore", str(tmp_path / "a" / "docvqa"), str(tmp_path / "b" / "docvqa")])
    assert list(res["tasks"]) == ["a/docvqa", "b/docvqa"]
    assert res["summary"]["1x1"]["overall"] == pytest.approx(
        (res["tasks"]["a/docvqa"]["1x1"]["NDCG@5"] + res["tasks"]["b/docvqa"]["1x1"]["NDCG@5"]) / 2)


def test_ndcg_hand_worked():
    qrels = {"q": {"a": 1}}
    assert evaluate.ndcg({"q": {"a": 3.0, "b": 2.0}}, qrels, 5) == 1.0
    assert evaluate.ndcg({"q": {"a": 2.0, "b": 3.0}}, qrels, 5) == pytest.approx(1 / math.log2(3))
    assert evaluate.ndcg({"q": {"a": 1.0, "b": 3.0}}, qrels, 1) == 0.0
    # graded relevance: gains 2 and 1, ranked 1 then 2 -> ideal; swapped -> (1 + 2/log2 3) / (2 + 1/log2 3)
    graded = {"q": {"a": 2, "b": 1}}
    assert evaluate.ndcg({"q": {"a": 2.0, "b": 1.0}}, graded, 5) == pytest.approx(1.0)
    assert evaluate.ndcg({"q": {"a": 1.0, "b": 2.0}}, graded, 5) == \
        pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    # ties: trec_eval orders equal scores by document id, descending: "b" before "a"
    assert evaluate.ndcg({"q": {"a": 1.0, "b": 1.0}}, qrels, 1) == 0.0
    assert evaluate.ndcg({"q": {"a": 1.0, "b": 1.0}}, {"q": {"b": 1}}, 1) == 1.0
    # mean over the queries of qrels; a query with no run scores 0; unjudged docs gain 0
    two = {"q1": {"a": 1}, "q2": {"x": 1}}
    assert evaluate.ndcg({"q1": {"a": 1.0, "zz": 0.5}}, two, 5) == pytest.approx(0.5)


def test_recall_and_precision_at_1():
    qrels = {"q": {"a": 1, "b": 1}}
    run = {"q": {"a": 3.0, "c": 2.0, "b": 1.0}}
    assert evaluate.recall(run, qrels, 1) == 0.5 and evaluate.recall(run, qrels, 3) == 1.0
    rows = [torch.tensor([0.9, 0.1, 0.3]), torch.tensor([0.2, 0.5]), torch.tensor([0.4, 0.4])]
    assert evaluate.mmeb_p_at_1(rows) == pytest.approx(2 / 3)  # a tie with the positive is a hit (VLM2Vec)


class KnownEmbeddings:
    """Stands in for the model: fixed embeddings by text, counting encode calls."""
    def __init__(self, table):
        self.table, self.calls = table, []
        R, self.dim = next(iter(table.values())).shape
        self.config = types.SimpleNamespace(num_query_tokens=R, num_candidate_tokens=R)

    def _enc(self, texts, images, batch_size=32, progress=False, out=None, workers=0):
        self.calls.append(len(texts))
        out[:] = torch.stack([self.table[self.key(t, im)] for t, im in zip(texts, images or [None] * len(texts))])
        return out

    def key(self, text, image):
        return text

    encode_queries = encode_candidates = _enc


def e(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_budgets_are_prefix_slices_of_one_encoding():
    # q0's first vector points at doc "x"'s first vector, but its second vector at "y"'s second:
    # at (1, 1) x wins; at (2, 2) y wins (1 + 1 > 1 + 0).
    table = {"q0": e([1, 0, 0, 0], [0, 1, 0, 0]),
             "x": e([1, 0, 0, 0], [0, 0, 1, 0]),
             "y": e([0.6, 0, 0, 0.8], [0, 1, 0, 0])}
    task = dict(queries={"q0": ("q0", None)}, corpus={"x": ("x", None), "y": ("y", None)},
                qrels={"q0": {"y": 1}})
    model = KnownEmbeddings(table)
    out, _ = evaluate.score_retrieval(model, task, [(1, 1), (2, 2)], ScoringOptions(8))
    assert model.calls == [1, 2]          # one query pass, one corpus pass, for both budgets
    assert out[(1, 1)]["P@1"] == 0.0 and out[(2, 2)]["P@1"] == 1.0
    assert out[(1, 1)]["NDCG@5"] == pytest.approx(1 / math.log2(3)) and out[(2, 2)]["NDCG@5"] == 1.0


def test_identical_items_encoded_once():
    table = {"a": e([1, 0]), "b": e([0, 1])}
    model = KnownEmbeddings(table)
    emb, index = evaluate.encode_unique(model, [("a", None), ("b", None), ("a", None)], "candidate", ScoringOptions(8))
    assert model.calls == [2] and index.tolist() == [0, 1, 0]


# -- MMEB-eval on a local copy ------------------------------------------------

def mmeb_eval_copy(tmp_path):
    images = tmp_path / "mmeb-images"
    images.mkdir()
    for name in ("cat", "dog"):
        Image.new("RGB", (28, 28), "red" if name == "cat" else "blue").save(images / f"{name}.png")
    rows = [dict(qry_text="<|image_1|>\nRepresent the given image for classification", qry_img_path="cat.png",
                 tgt_text=["cat", "dog"], tgt_img_path=["", ""]),
            dict(qry_text="<|image_1|>\nRepresent the given image for classification", qry_img_path="dog.png",
                 tgt_text=["dog", "cat"], tgt_img_path=["", ""])]
    ret = [dict(qry_text="a red picture", qry_img_path="", tgt_text=["", ""], tgt_img_path=["cat.png", "dog.png"])]
    repo = write_hub_repo(tmp_path / "MMEB-eval", {"VOC2007": {"test": rows}, "CIRR": {"test": ret}})
    return repo, str(images)


def test_mmeb_p_at_1_with_known_embeddings(tmp_path):
    repo, images = mmeb_eval_copy(tmp_path)
    rows = hub.load_mmeb_eval(repo, "VOC2007", images)
    assert rows[0]["qry"][1].endswith("cat.png") and rows[0]["cands"] == [("cat", None), ("dog", None)]

    class ByImage(KnownEmbeddings):  # the query embedding depends on its image
        def key(self, text, image):
            return text if image is None else image.rsplit("/", 1)[-1]
    # the cat image looks like "cat"; the dog image ALSO looks like "cat": P@1 = 1/2
    model = ByImage({"cat.png": e([1, 0]), "dog.png": e([1, 0.1]), "cat": e([1, 0]), "dog": e([0, 1])})
    out, _ = evaluate.score_mmeb(model, rows, [(1, 1)], ScoringOptions(8))
    assert out[(1, 1)]["P@1"] == 0.5
    assert model.calls == [2, 2]  # 2 unique queries, 2 unique candidates (4 listed)
    # a duplicate of the positive among the candidates (encoded once, so an exact tie): a hit
    dup = [dict(qry=rows[0]["qry"], cands=[("cat", None), ("dog", None), ("cat", None)])]
    out, _ = evaluate.score_mmeb(model, dup, [(1, 1)], ScoringOptions(8))
    assert out[(1, 1)]["P@1"] == 1.0


def test_mmeb_errors(tmp_path):
    repo, images = mmeb_eval_copy(tmp_path)
    with pytest.raises(FileNotFoundError, match="image folder .*nowhere"):
        hub.load_mmeb_eval(repo, "VOC2007", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no subset 'GQA'"):
        hub.load_mmeb_eval(repo, "GQA", images)
    (tmp_path / "mmeb-images" / "dog.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"MMEB-eval/VOC2007 row 1: image .*dog.png"):
        hub.load_mmeb_eval(repo, "VOC2007", images)


def test_mmeb_end_to_end_and_aggregation(tmp_path, capsys, tiny_checkpoint):
    repo, images = mmeb_eval_copy(tmp_path)
    ck = tiny_checkpoint
    res = evaluate.main(["--checkpoint", str(ck), "--benchmark", "mmeb", "--mmeb", repo, "--mmeb-images", images,
                         "--subsets", "VOC2007", "CIRR", "--budgets", "1,64", "--output", str(tmp_path / "r.json")])
    s = res["summary"]["16x64"]
    assert set(res["tasks"]) == {"VOC2007", "CIRR"}
    assert s["Classification"] == res["tasks"]["VOC2007"]["16x64"]["P@1"]
    assert s["IND"] == pytest.approx((s["Classification"] + s["Retrieval"]) / 2)  # both are IND subsets
    assert "OOD" not in s
    assert json.loads((tmp_path / "r.json").read_text())["budgets"] == ["1x1", "16x64"]
    assert "Classification" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown MMEB subset.*Nope"):
        evaluate.main(["--checkpoint", str(ck), "--benchmark", "mmeb", "--mmeb", repo, "--mmeb-images", images,
                       "--subsets", "Nope"])


# -- ViDoRe layouts ----------------------------------------------------------------

def test_vidore_v1_layout(tmp_path):
    import datasets
    feats = datasets.Features({"query": datasets.Value("string"), "image": datasets.Image(),
                               "image_filename": datasets.Value("string")})
    rows = [dict(query="q1", image=Image.new("RGB", (20, 20)), image_filename="p1.png"),
            dict(query=None, image=Image.new("RGB", (20, 20)), image_filename="p2.png"),
            dict(query="q1", image=Image.new("RGB", (20, 20)), image_filename="p3.png"),
            dict(query="q2", image=Image.new("RGB", (20, 20)), image_filename="p2.png")]
    repo = write_hub_repo(tmp_path / "docvqa_test_subsampled", {"default": {"test": rows}}, features=feats)
    task = hub.load_vidore(repo)
    assert set(task["corpus"]) == {"p1.png", "p2.png", "p3.png", "p2.png#row3"}          # p2.png on two rows
    assert task["same_doc"]["p2.png#row3"] == "p2.png"
    assert list(task["queries"]) == ["q1", "q2"]                         # de-duplicated, None dropped
    assert task["qrels"] == {"q1": {"p3.png": 1}, "q2": {"p2.png": 1}}      # q1's last row (the official rule)
    page = task["corpus"]["p3.png"][1]                                   # decoded only when called
    assert isinstance(page, hub.LazyImage) and page().size == (20, 20)


def test_vidore_beir_layout_and_cli(tmp_path, tiny_checkpoint):
    import datasets
    corpus = [dict(**{"corpus-id": i, "image": Image.new("RGB", (28, 28), (50 * i, 0, 0))}) for i in range(3)]
    queries = [{"query-id": 7, "query": "red page"}, {"query-id": 8, "query": "no judgement"}]
    qrels = [{"query-id": 7, "corpus-id": 2, "score": 2}, {"query-id": 7, "corpus-id": 1, "score": 0}]
    root = tmp_path / "esg_reports_v2_beir"
    write_hub_repo(root, {"corpus": {"test": corpus}, "queries": {"test": queries}, "qrels": {"test": qrels}},
                   features={"corpus": datasets.Features({"corpus-id": datasets.Value("int64"), "image": datasets.Image()})})
    task = hub.load_vidore(str(root))
    assert task["qrels"] == {"7": {"2": 2}} and list(task["queries"]) == ["7"] and len(task["corpus"]) == 3
    ck = tiny_checkpoint
    res = evaluate.main(["--checkpoint", str(ck), "--benchmark", "vidore", "--vidore", str(root),
                         "--budgets", "1,16", "--plot", str(tmp_path / "p.png")])
    r = res["tasks"]["esg_reports_v2_beir"]["8x16"]
    # one judged query, relevant page "2" with gain 2: NDCG@5 = 1 / log2(rank + 1) for its rank 1-3
    assert r["num_candidates"] == 3
    assert min(abs(r["NDCG@5"] - 1 / math.log2(rank + 1)) for rank in (1, 2, 3)) < 1e-9
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_cli_errors(tmp_path, monkeypatch):
    from machinery import checkpoints
    for module in (evaluate, checkpoints):
        monkeypatch.setattr(module, "DEFAULT_CHECKPOINT", str(tmp_path / "out" / "tiny-synthetic"))
    with pytest.raises(SystemExit, match="no MetaEmbed checkpoint.*run `python train.py` first"):
        evaluate.main(["--budgets", "1"])
    ck = tmp_path / "ck"
    from metaembed import MetaEmbed
    MetaEmbed.from_backbone("tiny", num_query_tokens=4, num_candidate_tokens=8, groups=((1, 1), (4, 8))) \
        .save_pretrained(ck)
    with pytest.raises(SystemExit, match="budget '64'"):
        evaluate.main(["--checkpoint", str(ck), "--budgets", "1,64"])
    with pytest.raises(SystemExit, match="budget .16x64.: 16x64 exceeds"):
        evaluate.main(["--checkpoint", str(ck), "--budgets", "16x64"])


def test_synthetic_end_to_end(tmp_path, tiny_checkpoint, tiny):
    ck = tiny_checkpoint
    res = evaluate.main(["--checkpoint", str(ck), "--synthetic-scenes", "8", "--budgets", "1,4,64",
                         "--output", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    assert res["budgets"] == ["1x1", "2x4", "16x64"]
    s = res["summary"]
    assert s["1x1"]["bytes_per_candidate"] == 1 * 64 * 4 and s["16x64"]["bytes_per_candidate"] == 64 * 64 * 4  # fp32: D < 128
    assert s["16x64"]["index_bytes"] == 64 * 64 * 4 * 32
    # P@1 at 2x4, recomputed by hand from the same model's embeddings (float32, as the index)
    task = data.synthetic_eval(8)["t2i"]
    qids, dids = list(task["queries"]), list(task["corpus"])
    q = tiny.encode_queries([task["queries"][x][0] for x in qids])
    c = tiny.encode_candidates(["" for _ in dids], [task["corpus"][d][1] for d in dids])
    best = maxsim(q[:, :2], c[:, :4]).argmax(1)
    want = sum(task["qrels"][x].get(dids[int(b)], 0) > 0 for x, b in zip(qids, best)) / len(qids)
    assert res["tasks"]["t2i"]["2x4"]["P@1"] == pytest.approx(want)


def test_low_bit_precisions_score_the_same_in_memory_and_on_disk(tmp_path):
    """--precision int8 / binary: in memory and from --index-dir's low-bit groups alike (the same
    numbers), bytes per candidate = r_c x (codes + a float32 scale); int8 stays near bf16."""
    common = ["--backbone", "tiny", "--synthetic-scenes", "8", "--budgets", "1,64", "--batch-size", "16"]
    ref = evaluate.main(common)
    for precision in ("int8", "binary"):
        mem = evaluate.main(common + ["--precision", precision])
        disk = evaluate.main(common + ["--precision", precision, "--index-dir", str(tmp_path / precision)])
        assert mem["precision"] == precision
        for t in ("t2i", "i2t"):
            for b in ("1x1", "16x64"):
                assert mem["tasks"][t][b]["NDCG@10"] == disk["tasks"][t][b]["NDCG@10"]
                if precision == "int8":
                    assert abs(mem["tasks"][t][b]["NDCG@10"] - ref["tasks"][t][b]["NDCG@10"]) <= 0.15
        per_vector = mem["dim"] + 4 if precision == "int8" else -(-mem["dim"] // 8) + 4
        assert mem["summary"]["16x64"]["bytes_per_candidate"] == 64 * per_vector
        assert any(p.name == f"group-16-64.{precision}.bin" for p in (tmp_path / precision).rglob("*.bin"))


def test_bad_inputs_stop_before_work(tmp_path, capsys):
    (tmp_path / "r.json").write_text("{}")
    for argv, said in ((["--max-rows", "0"], "--max-rows must be at least 1"),
                       (["--batch-size", "0"], "--batch-size must be at least 1"),
                       (["--output", str(tmp_path / "nowhere" / "r.json")], "cannot write --output"),
                       (["--plot", str(tmp_path)], "cannot write --plot"),
                       (["--objects", "5"], "--objects must be two integers"),
                       (["--index-dir", str(tmp_path / "r.json" / "idx")], "cannot write --index-dir")):
        with pytest.raises(SystemExit):
            evaluate.get_args(argv)
        assert re.search(said, capsys.readouterr().err), argv
    with pytest.raises(SystemExit, match=r"^evaluate.py: error: unknown backbone 'nope-9b'"):
        evaluate.main(["--backbone", "nope-9b"])


def test_mmeb_row_without_candidates_is_refused(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    rows = [dict(qry_text="q", qry_img_path="", tgt_text=["a"], tgt_img_path=[""]),
            dict(qry_text="q2", qry_img_path="", tgt_text=[], tgt_img_path=[])]
    import datasets
    feats = datasets.Features({"qry_text": datasets.Value("string"), "qry_img_path": datasets.Value("string"),
                               "tgt_text": datasets.Sequence(datasets.Value("string")),
                               "tgt_img_path": datasets.Sequence(datasets.Value("string"))})
    repo = write_hub_repo(tmp_path / "MMEB-eval", {"OK-VQA": {"test": rows}}, features=feats)
    with pytest.raises(ValueError, match="MMEB-eval/OK-VQA row 1: no candidates"):
        hub.load_mmeb_eval(repo, "OK-VQA", str(images))


def test_corrupt_page_in_a_dataset_is_named(tmp_path, tiny):
    class Broken:
        def __call__(self):
            from PIL import UnidentifiedImageError
            raise UnidentifiedImageError("cannot identify image file")
    with pytest.raises(ValueError, match=r"cannot decode image \(item 1\): cannot identify"):
        tiny.encode_candidates(["", ""], [Image.new("RGB", (28, 28)), Broken()])


def test_maxsim_path_from_the_environment(monkeypatch, tmp_path):
    """METAEMBED_MAXSIM on the command line forces a MaxSim path (read by maxsim.maxsim), and a
    path that does not exist is one line, not a traceback."""
    import maxsim as maxsim_module
    from machinery import cpu_kernel
    used, chunked, fused = [], maxsim_module.maxsim_chunked, cpu_kernel.maxsim_c
    monkeypatch.setattr(maxsim_module, "maxsim_chunked", lambda *a, **k: used.append("torch") or chunked(*a, **k))
    monkeypatch.setattr(cpu_kernel, "maxsim_c", lambda *a, **k: used.append("c") or fused(*a, **k))
    argv = ["--backbone", "tiny", "--synthetic-scenes", "4", "--budgets", "1,64", "--batch-size", "16"]
    for path in ("torch", "c") if cpu_kernel.library() is not None else ("torch",):
        monkeypatch.setenv("METAEMBED_MAXSIM", path)
        used.clear()
        evaluate.main(argv)
        assert used and set(used) == {path}, (path, set(used))
    monkeypatch.setenv("METAEMBED_MAXSIM", "bogus")
    with pytest.raises(SystemExit, match=r"^evaluate.py: error: unknown maxsim backend 'bogus'"):
        evaluate.main(argv)


def test_pages_sharing_a_filename_merge_by_max():
    """ViDoRe v1 rows sharing an image_filename (the official evaluator): each page is scored and the
    document takes the best of them, whichever row came first."""
    table = {"q": e([1, 0]), "x": e([0, 1]), "y": e([1, 0]), "z": e([0.6, 0.8])}
    task = dict(queries={"q": ("q", None)}, corpus={"p": ("x", None), "p#row1": ("y", None), "o": ("z", None)},
                qrels={"q": {"p": 1}}, same_doc={"p": "p", "p#row1": "p", "o": "o"})
    out, _ = evaluate.score_retrieval(KnownEmbeddings(table), task, [(1, 1)], ScoringOptions(8))
    assert out[(1, 1)]["P@1"] == 1.0 and out[(1, 1)]["NDCG@5"] == 1.0       # p scores 1.0 (row y), not 0.0 (row x)
    del task["same_doc"]
    out, _ = evaluate.score_retrieval(KnownEmbeddings(table), task, [(1, 1)], ScoringOptions(8))
    assert out[(1, 1)]["P@1"] == 0.0                                        # without the merge, "p#row1" wins
