"""MetaEmbed in mteb: a local retrieval task (scenes and captions made here) through mteb.evaluate
scores as evaluate.py does, at every budget, from one encoding."""
import pytest
import torch

import data
import evaluate

mteb = pytest.importorskip("mteb", reason="mteb is not installed: pip install 'mteb>=2.26,<3'")
from datasets import Dataset  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402

from maxsim import maxsim, maxsim_pairwise  # noqa: E402

TASK = data.synthetic_eval(10, n_variants=2)["t2i"]      # 10 captions against 30 scenes (and one-change variants)


class LocalScenes(AbsTaskRetrieval):
    """A local mteb retrieval task: its data built here, not downloaded."""
    metadata = TaskMetadata(
        name="LocalSyntheticScenesT2I", description="synthetic captions -> scenes", reference=None,
        dataset={"path": "local", "revision": "local"}, type="Any2AnyRetrieval", category="t2i",
        modalities=["image", "text"], eval_splits=["test"], eval_langs=["eng-Latn"], main_score="ndcg_at_5",
        date=("2026-12-01", "2026-12-01"), domains=[], task_subtypes=[], license="cc-by-4.0",
        annotations_creators="derived", dialect=[], sample_creation="created", bibtex_citation="")

    def load_data(self, **kwargs):
        qids, dids = list(TASK["queries"]), list(TASK["corpus"])
        self.dataset = {"default": {"test": RetrievalSplitData(
            queries=Dataset.from_dict({"id": qids, "text": [TASK["queries"][q][0] for q in qids]}),
            corpus=Dataset.from_dict({"id": dids, "image": [TASK["corpus"][d][1] for d in dids]}),
            relevant_docs=TASK["qrels"], top_ranked=None)}}
        self.data_loaded = True


def test_mteb_scores_as_evaluate_does_at_every_budget(tiny, tmp_path):
    from machinery import mteb_adapter
    budgets = [(1, 1), (2, 4), (8, 16), (16, 64)]
    cache = {}
    got = {}
    for rq, rc in budgets:
        enc = mteb_adapter.MetaEmbedEncoder(tiny, (maxsim, maxsim_pairwise), (rq, rc), cache)
        result = mteb.evaluate(enc, [LocalScenes()], cache=mteb.cache.ResultCache(tmp_path / f"{rq}x{rc}"),
                               overwrite_strategy="always", show_progress_bar=False)
        got[(rq, rc)] = next(iter(result.task_results[0].scores.values()))[0]["ndcg_at_5"]
        assert enc.encoded == (40 if (rq, rc) == (1, 1) else 0)      # 10 queries + 30 documents, encoded once
    own, _ = evaluate.score_retrieval(tiny, TASK, budgets, evaluate.ScoringOptions(16, precision="float32"))
    for b in got:              # mteb stores scores rounded to 5 decimals: equal to that rounding
        assert got[b] == pytest.approx(own[b]["NDCG@5"], abs=5e-6), b
    assert len(set(got.values())) > 1                                 # the budgets do differ here
    assert list((tmp_path / "2x4").rglob("LocalSyntheticScenesT2I.json"))   # mteb's own results layout, per budget


def test_the_encoder_protocol(tiny_checkpoint):
    enc = evaluate.mteb_model(tiny_checkpoint, budget=(2, 4))
    meta = enc.mteb_model_meta
    assert meta.similarity_fn_name.value == "MaxSim" and meta.model_type == ["late-interaction"]
    assert meta.modalities == ["image", "text"] and meta.experiment_kwargs == {"budget": "2x4"}
    q = enc.encode([{"text": ["red top left", "blue center"]}], prompt_type=mteb.types.PromptType.query)
    d = enc.encode([{"image": [data.render(data.synthetic_scene("eval", i)) for i in range(3)]}],
                   prompt_type=mteb.types.PromptType.document)
    assert q.shape == (2, 2, enc.model.dim) and d.shape == (3, 4, enc.model.dim)
    from maxsim import maxsim_reference
    torch.testing.assert_close(enc.similarity(q, d), maxsim_reference(q, d), atol=1e-5, rtol=0)
    torch.testing.assert_close(enc.similarity_pairwise(q, d[:2]), maxsim_reference(q, d[:2]).diagonal(), atol=1e-5, rtol=0)


def test_cli_names_what_is_wrong(tiny_checkpoint):
    with pytest.raises(SystemExit, match="--mteb NoSuchBenchmark9: neither an mteb benchmark nor a task"):
        evaluate.main(["--checkpoint", tiny_checkpoint, "--mteb", "NoSuchBenchmark9", "--budgets", "1"])


def test_mteb_model_checks_the_budget_by_the_one_rule(tiny_checkpoint, tmp_path):
    """#7: the budget rule of the command lines, before the encoder is built; an ablation checkpoint
    at budget 1 is (1, 1) here as in search.py and explain.py."""
    for budget, said in (((0, 0), "r_q and r_c must be at least 1"), ((-1, -1), "r_q and r_c must be at least 1"),
                         ((100, 1000), "exceeds the trained meta tokens"), ("3x5x", "not a number or 'AxB'"),
                         ("", "empty"), ((1.5, 2), "a pair must be two whole numbers")):
        with pytest.raises(ValueError, match=f"^budget .*{said}"):
            evaluate.mteb_model(tiny_checkpoint, budget=budget)
    assert evaluate.mteb_model(tiny_checkpoint, budget="2x4").budget == (2, 4)
    from metaembed import MetaEmbed
    ablation = MetaEmbed.from_backbone("tiny", seed=0, groups=((16, 64),))
    assert evaluate.mteb_model(ablation, budget="1").budget == (1, 1)


def test_a_16_bit_image_encodes_as_the_project_reads_it(tiny, tmp_path):
    """#8: the adapter reads images through backbones.load_image: a 16-bit gradient is not white."""
    import numpy as np
    from PIL import Image

    from machinery.backbones import load_image
    x = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(x).save(tmp_path / "g16.png")
    im16 = Image.open(tmp_path / "g16.png")
    assert im16.mode.startswith("I")
    enc = evaluate.mteb_model(tiny, budget=(16, 64))
    got = enc.encode([{"image": [im16]}], prompt_type=mteb.types.PromptType.document)
    want = tiny.encode_candidates([""], [load_image(str(tmp_path / "g16.png"))])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_an_unreachable_hub_is_one_line_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    """#11: mteb failing to download (offline) is one line; no empty results folder is left."""
    from machinery import mteb_adapter

    def offline(*a, **k):
        raise ConnectionError("Max retries exceeded with url: /api/datasets/vidore/x (offline)")
    monkeypatch.setattr(mteb, "evaluate", offline)
    with pytest.raises(ValueError, match="^mteb could not load the data of LocalSyntheticScenesT2I .*ConnectionError"):
        mteb_adapter.run(tiny, (maxsim, maxsim_pairwise), [LocalScenes()], [(1, 1)], str(tmp_path / "results" / "mteb"))
    assert not (tmp_path / "results").exists()
