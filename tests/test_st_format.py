"""#40: every checkpoint folder is also a sentence-transformers MultiVectorEncoder (machinery/st_format.py):
it loads without this repository, gives our own vectors at every budget, and mteb scores it as
evaluate.py's mteb path does."""
import ast
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import data
import evaluate
from machinery import st_format
from maxsim import maxsim
from metaembed import MetaEmbed

pytest.importorskip("sentence_transformers", reason="pip install 'sentence-transformers>=6.3,<7'")
from sentence_transformers import MultiVectorEncoder  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["red top left, blue center", "green bottom right"]


@pytest.fixture(autouse=True)
def modules_cache(tmp_path, monkeypatch):
    """transformers copies a folder's code into its modules cache: the test's own, not the user's."""
    import transformers.dynamic_module_utils as dmu
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))


def scenes(n=3):
    return [data.render(data.synthetic_scene("eval", i)) for i in range(n)]


def stack(vectors):
    return torch.stack([torch.as_tensor(v).cpu() for v in vectors])


def ours(model, images):
    """Our own vectors: queries (text; image with text; image alone), documents (image, text, both)."""
    q = torch.cat([model.encode_queries(TEXTS), model.encode_queries(["red", ""], images[:2])])
    d = model.encode_candidates(["", "a text", "a caption"], [images[0], None, images[1]])
    return q, d


def theirs(m, images, **budget):
    q = m.encode_query([*TEXTS, {"image": images[0], "text": "red"}, {"image": images[1]}],
                       **({"num_vectors": budget["r_q"]} if "r_q" in budget else {}))
    d = m.encode_document([images[0], "a text", {"image": images[1], "text": "a caption"}],
                          **({"num_vectors": budget["r_c"]} if "r_c" in budget else {}))
    return stack(q), stack(d)


def test_a_trained_checkpoint_loads_without_the_repository(tmp_path):
    """Done-when of #40: a freshly trained offline checkpoint, in a process whose sys.path holds no
    repository (cwd elsewhere, no PYTHONPATH): the three lines work and give our vectors, the
    Matryoshka prefix per call, the --default-budget without num_vectors, MaxSim as similarity."""
    import train
    args = train.get_args(["--query-tokens", "4", "--candidate-tokens", "8", "--synthetic-size", "64", "--no-progress",
                           "--steps", "3", "--batch-size", "4", "--default-budget", "2x4", "--out", str(tmp_path / "run")])
    ck = train.train(args)
    images = scenes()
    for i, im in enumerate(images):
        im.save(tmp_path / f"{i}.png")
    child = tmp_path / "elsewhere"
    child.mkdir()
    script = f"""
import importlib.util, sys
import torch
from PIL import Image
from safetensors.torch import save_file
assert importlib.util.find_spec("metaembed") is None and importlib.util.find_spec("machinery") is None, sys.path
from sentence_transformers import MultiVectorEncoder
m = MultiVectorEncoder({str(ck)!r}, trust_remote_code=True)
images = [Image.open({str(tmp_path)!r} + f"/{{i}}.png") for i in range(3)]
stack = lambda v: torch.stack(list(v))
queries = {TEXTS!r} + [{{"image": images[0], "text": "red"}}, {{"image": images[1]}}]
documents = [images[0], "a text", {{"image": images[1], "text": "a caption"}}]
q, d = m.encode_query(queries, num_vectors=4), m.encode_document(documents, num_vectors=8)
q_def, d_def = m.encode_query(queries), m.encode_document(documents)
save_file({{"q": stack(q), "d": stack(d), "q3": stack(m.encode_query(queries, num_vectors=3)),
           "d1": stack(m.encode_document([images[2]], num_vectors=1)), "q_def": stack(q_def), "d_def": stack(d_def),
           "sim": m.similarity(q_def, d_def)}}, "out.safetensors")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_MODULES_CACHE": str(tmp_path / "mods")}
    done = subprocess.run([sys.executable, "-c", script], cwd=child, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file
    got = load_file(child / "out.safetensors")
    model = MetaEmbed.from_pretrained(ck)
    q, d = ours(model, images)
    torch.testing.assert_close(got["q"], q, atol=1e-4, rtol=0)
    torch.testing.assert_close(got["d"], d, atol=1e-4, rtol=0)
    torch.testing.assert_close(got["q3"], q[:, :3], atol=1e-4, rtol=0)          # the Matryoshka prefix
    torch.testing.assert_close(got["d1"], model.encode_candidates([""], [images[2]])[:, :1], atol=1e-4, rtol=0)
    torch.testing.assert_close(got["q_def"], q[:, :2], atol=1e-4, rtol=0)       # --default-budget 2x4
    torch.testing.assert_close(got["d_def"], d[:, :4], atol=1e-4, rtol=0)
    torch.testing.assert_close(got["sim"].cpu(), maxsim(q[:, :2], d[:, :4]), atol=1e-4, rtol=0)   # no division by r_q
    assert json.load(open(os.path.join(ck, st_format.SETTINGS_FILE))) == {"budget": [2, 4]}


def lora_backbone(hub_backbone):
    """The real-layout tiny Qwen2-VL through the hub path (LoRA), in float32 for a 1e-4 comparison,
    its adapters and meta tokens moved off their initial values (B = 0 would hide a lost adapter)."""
    model = MetaEmbed.from_backbone(hub_backbone, dtype="float32")
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name or name == "meta_tokens":
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("backbone", ["tiny", "hub-lora", "tiny-qwen3-vl"])
def test_the_folders_code_gives_our_vectors(backbone, hub_backbone, tmp_path):
    """One copy of the paper's code: the folder's metaembed_st.py (written from metaembed.py and the
    machinery at save time, loaded as transformers' dynamic module, apart from ours) gives the
    vectors of the project's own MetaEmbed, on the tiny backbone, the real-layout tiny Qwen2-VL
    with LoRA and a tiny Qwen3-VL."""
    model = lora_backbone(hub_backbone) if backbone == "hub-lora" else MetaEmbed.from_backbone(backbone, seed=3)
    model.save_pretrained(tmp_path / "ck")
    code = (tmp_path / "ck" / st_format.CODE_FILE).read_text()
    assert ("from peft import" in code) == (backbone == "hub-lora")      # peft only where LoRA is used
    m = MultiVectorEncoder(str(tmp_path / "ck"), trust_remote_code=True)
    assert type(m[0]).__module__.startswith("transformers_modules.")       # the folder's code, not ours
    images = scenes()
    q, d = ours(model, images)
    got_q, got_d = theirs(m, images)                                       # default: every vector
    torch.testing.assert_close(got_q, q, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_d, d, atol=1e-4, rtol=0)
    got_q, got_d = theirs(m, images, r_q=2, r_c=4)
    torch.testing.assert_close(got_q, q[:, :2], atol=1e-4, rtol=0)
    torch.testing.assert_close(got_d, d[:, :4], atol=1e-4, rtol=0)
    assert m.get_embedding_dimension() == model.dim
    if backbone == "tiny":                     # sentence-transformers' own save gives the same model back
        m.save(str(tmp_path / "resaved"))
        again = MultiVectorEncoder(str(tmp_path / "resaved"), trust_remote_code=True)
        torch.testing.assert_close(stack(again.encode_query(TEXTS, num_vectors=3)), q[:2, :3], atol=1e-4, rtol=0)


def test_the_folders_code_is_the_repositorys_verbatim(tiny_checkpoint):
    """Every definition in metaembed_st.py is a verbatim copy from the repository file its section
    names; only the import lines, the module alias line and the left-out stubs are generated."""
    text = open(os.path.join(tiny_checkpoint, st_format.CODE_FILE)).read()
    files = {}
    for line in text.splitlines():
        if line.startswith("# from "):
            path = line.split()[2]
            files[path] = open(os.path.join(ROOT, path)).read()
    assert set(files) == {"machinery/checks.py", "machinery/backbones.py", "machinery/checkpoints.py", "metaembed.py",
                          "machinery/options.py", "machinery/precision.py", "machinery/st_module.py"}
    tree = ast.parse(text)
    copied = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Assign))]
    stubs = {n.name for n in copied if isinstance(n, ast.FunctionDef) and "NotImplementedError" in ast.unparse(n)
             and n.end_lineno - n.lineno <= 2}
    assert stubs == {"add_lora", "build", "save"}
    for node in copied:
        segment = ast.get_source_segment(text, node)
        if getattr(node, "name", None) in stubs or segment.endswith("= sys.modules[__name__]"):
            continue
        assert any(segment in f for f in files.values()), segment[:200]
    for name in ("MetaEmbed", "MetaEmbedConfig", "format_prompt", "prepare", "load_image", "MetaEmbedModule"):
        assert any(getattr(n, "name", None) == name for n in copied), name


def test_what_the_folder_carries_and_what_it_names(tmp_path):
    """The closure: a name the model class reaches in a project file the folder does not carry
    (maxsim.py) becomes a stub naming it (saving never fails on it; calling it says why); a
    machinery/ file's is copied, whichever file."""
    paper = tmp_path / "fakepaper.py"
    paper.write_text("from maxsim import maxsim_reference\n\n\nclass MetaEmbed:\n    def score(self, q, c):\n"
                     "        return maxsim_reference(q, c)\n")
    module = types.ModuleType("fakepaper")
    module.__file__ = str(paper)
    code = st_format.module_code(module)
    assert "\ndef maxsim_reference(*args, **kwargs):" in code and "def maxsim_reference(q" not in code
    namespace = {"__name__": "fakefolder"}
    sys.modules["fakefolder"] = types.ModuleType("fakefolder")
    try:
        exec(compile(code, "metaembed_st.py", "exec"), namespace)
    finally:
        del sys.modules["fakefolder"]
    with pytest.raises(NotImplementedError, match=r"^maxsim_reference\(\) is left out of this folder: fakepaper "
                                                  r"takes it from maxsim.maxsim_reference, which this folder's code"):
        namespace["MetaEmbed"]().score(None, None)
    paper.write_text("from machinery.checks import maxsim_float64\n\n\nclass MetaEmbed:\n    def score(self, q, c):\n"
                     "        return maxsim_float64(q, c)\n")           # what machinery/ holds is carried, any file
    code = st_format.module_code(module)
    assert "\ndef maxsim_float64(" in code and "# from machinery/checks.py" in code and "maxsim_reference" not in code


def test_bad_budgets_and_inputs_are_one_line(tiny, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^default budget '17x4': 17x4 exceeds the trained meta tokens"):
        tiny.save_pretrained(tmp_path / "bad", budget="17x4")
    assert not (tmp_path / "bad").exists()
    tiny.save_pretrained(tmp_path / "ck", budget=4)                           # a number names a group: 2x4
    m = MultiVectorEncoder(str(tmp_path / "ck"), trust_remote_code=True)
    assert [tuple(v.shape) for v in m.encode_query(TEXTS)] == [(2, tiny.dim)] * 2
    for bad in (0, 17, 2.5):
        with pytest.raises(ValueError, match=rf"^num_vectors={bad}: a query of this model has 16 vectors"):
            m.encode_query(TEXTS, num_vectors=bad)
    with pytest.raises(ValueError, match=r"^num_vectors=65: a candidate of this model has 64 vectors"):
        m.encode_document(TEXTS, num_vectors=65)
    with pytest.raises(TypeError, match=r"^an input \"\{'image': None, 'caption': 'b'\}\" is a dict, not a text, a PIL"):
        m.encode_document(["a", {"image": None, "caption": "b"}])
    import train
    with pytest.raises(SystemExit):
        train.get_args(["--default-budget", "3x5x"])
    assert "--default-budget '3x5x': not a number or 'AxB'" in capsys.readouterr().err


def test_a_hub_backbone_offline_is_one_line_naming_it(hub_backbone, tmp_path):
    """A LoRA checkpoint names its base model and loads it as from_pretrained does: offline, with the
    model not cached, one line naming the model id (machinery/backbones.py's require_hub)."""
    lora_backbone(hub_backbone).save_pretrained(tmp_path / "ck")
    cfg = json.load(open(tmp_path / "ck" / "metaembed.json"))
    cfg["backbone"] = "qwen2-vl-2b"
    json.dump(cfg, open(tmp_path / "ck" / "metaembed.json", "w"))
    with pytest.raises(FileNotFoundError, match=r"^model 'Qwen/Qwen2-VL-2B-Instruct' is not in the local cache"):
        MultiVectorEncoder(str(tmp_path / "ck"), trust_remote_code=True)
    card = st_format.model_card(cfg, 64, (16, 64))
    assert "base_model: Qwen/Qwen2-VL-2B-Instruct" in card and "with LoRA adapters" in card


def test_the_model_card(tiny, tmp_path, capsys):
    """README.md: what it is, the three lines, the budgets with bytes per candidate, the results
    evaluate.py --card writes in, license, citation."""
    tiny.save_pretrained(tmp_path / "ck", budget="2x4")
    card = (tmp_path / "ck" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
    assert "model = MultiVectorEncoder(\"multi_vector_encoder_model_id\", trust_remote_code=True)" in card
    D = tiny.dim
    assert f"| 2x4 (default) | 4 | {4 * D * 2:,} | {4 * D * 4:,} | {2 * 2 * 4 * D:,} |" in card
    assert f"| 16x64 | 64 | {64 * D * 2:,} |" in card
    assert "Not evaluated yet" in card and "## License" in card and "@inproceedings{xiao2026metaembed" in card
    res = evaluate.main(["--checkpoint", str(tmp_path / "ck"), "--synthetic-scenes", "4", "--budgets", "1,4", "--card"])
    card = (tmp_path / "ck" / "README.md").read_text()
    assert "Not evaluated yet" not in card and "## License" in card
    assert f"| 2x4 | {100 * res['tasks']['t2i']['2x4']['P@1']:.1f} |" in card
    assert f"{100 * res['summary']['1x1']['overall']:.1f} | {res['summary']['1x1']['bytes_per_candidate']:,} |" in card
    m = MultiVectorEncoder(str(tmp_path / "ck"), trust_remote_code=True)     # push_to_hub's card: ours, with the id
    m.model_card_data.model_id = "someone/metaembed-tiny"
    (tmp_path / "pushed").mkdir()
    m._create_model_card(str(tmp_path / "pushed"))
    pushed = (tmp_path / "pushed" / "README.md").read_text()
    assert "model = MultiVectorEncoder(\"someone/metaembed-tiny\", trust_remote_code=True)" in pushed
    assert pushed.replace("someone/metaembed-tiny", "multi_vector_encoder_model_id") == card
    os.remove(tmp_path / "ck" / "README.md")                                  # a checkpoint from before cards
    with pytest.raises(ValueError, match="README.md: no MetaEmbed model card to write the results into"):
        st_format.write_results(str(tmp_path / "ck"), res)
    with pytest.raises(SystemExit):
        evaluate.get_args(["--backbone", "tiny", "--card"])
    assert "--card writes into a checkpoint's model card: give --checkpoint" in capsys.readouterr().err


# -- mteb natively -----------------------------------------------------------------------------------

def text_task():
    """A local text retrieval task (no download): scene captions read backwards -> captions of the scenes
    and their one-change variants."""
    import random

    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata
    rng = random.Random(0)
    corpus, queries, qrels = {}, {}, {}
    for i in range(10):
        scene = data.synthetic_scene("eval", i)
        corpus[f"s{i}"] = data.caption(scene)
        corpus[f"s{i}v"] = data.caption(data.variant(scene, rng))
        queries[f"q{i}"] = ", ".join(reversed(data.caption(scene).split(", ")))
        qrels[f"q{i}"] = {f"s{i}": 1}

    class LocalCaptions(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="LocalSyntheticCaptionsT2T", description="captions read backwards -> captions", reference=None,
            dataset={"path": "local", "revision": "local"}, type="Retrieval", category="t2t", modalities=["text"],
            eval_splits=["test"], eval_langs=["eng-Latn"], main_score="ndcg_at_5", date=("2026-12-01", "2026-12-01"),
            domains=[], task_subtypes=[], license="cc-by-4.0", annotations_creators="derived", dialect=[],
            sample_creation="created", bibtex_citation="")

        def load_data(self, **kwargs):
            self.dataset = {"default": {"test": RetrievalSplitData(
                queries=Dataset.from_dict({"id": list(queries), "text": list(queries.values())}),
                corpus=Dataset.from_dict({"id": list(corpus), "text": list(corpus.values())}),
                relevant_docs=qrels, top_ranked=None)}}
            self.data_loaded = True
    return LocalCaptions()


def mteb_scores(mteb, model, task, folder):
    result = mteb.evaluate(model, [task], cache=mteb.cache.ResultCache(folder), overwrite_strategy="always",
                           show_progress_bar=False)
    return next(iter(result.task_results[0].scores.values()))[0]


def test_mteb_evaluates_the_folder_natively_as_evaluate_does(tmp_path):
    """mteb.evaluate(MultiVectorEncoder(folder)) on a local retrieval task, at the folder's default
    budget, gives evaluate.mteb_model's scores at that budget (4 decimals). mteb 2.26 takes a
    MultiVectorEncoder object as text-only (its ModelMeta ignores the model's modalities), so the
    image task (test_mteb's scenes) runs through mteb's MultiVectorWrapper with the image modality
    named: the same scores there too."""
    mteb = pytest.importorskip("mteb")
    from test_mteb import LocalScenes
    model = MetaEmbed.from_backbone("tiny", seed=5)
    model.save_pretrained(tmp_path / "ck", budget="2x4")
    m = MultiVectorEncoder(str(tmp_path / "ck"), trust_remote_code=True)
    got = mteb_scores(mteb, m, text_task(), tmp_path / "st")
    own = mteb_scores(mteb, evaluate.mteb_model(str(tmp_path / "ck"), budget="2x4"), text_task(), tmp_path / "own")
    for metric in ("ndcg_at_5", "ndcg_at_10", "map_at_10", "recall_at_5", "mrr_at_10"):
        assert round(got[metric], 4) == round(own[metric], 4), metric
    at_1x1 = mteb_scores(mteb, evaluate.mteb_model(str(tmp_path / "ck"), budget="1x1"), text_task(), tmp_path / "1")
    assert at_1x1["ndcg_at_10"] != own["ndcg_at_10"] or at_1x1["map_at_10"] != own["map_at_10"]   # budgets differ here
    from mteb.models import MultiVectorWrapper
    wrapped = MultiVectorWrapper(m)
    wrapped.mteb_model_meta = wrapped.mteb_model_meta.model_copy(update={"modalities": ["image", "text"]})
    got = mteb_scores(mteb, wrapped, LocalScenes(), tmp_path / "st-image")
    own = mteb_scores(mteb, evaluate.mteb_model(str(tmp_path / "ck"), budget="2x4"), LocalScenes(), tmp_path / "own-image")
    assert round(got["ndcg_at_5"], 4) == round(own["ndcg_at_5"], 4) and round(got["map_at_10"], 4) == round(own["map_at_10"], 4)
