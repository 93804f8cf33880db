"""MetaEmbed as an mteb 2.x encoder (late interaction, MaxSim through maxsim.maxsim), so mteb's own
evaluator scores it the way the ViDoRe and MTEB leaderboards do, at any budget.

mteb's ModelMeta.load_model wants torchvision for image models (the mteb[image] extra), and
torchvision from PyPI does not import beside this project's CPU torch: the encoder object is
built directly and carries its mteb_model_meta, which mteb.evaluate accepts as it is.
"""
import json
import os
import time

import mteb  # noqa: F401 - an ImportError here is evaluate.py's one-line hint
import torch

from machinery import report
from machinery.backbones import image_key, load_image


class MetaEmbedEncoder:
    """mteb's EncoderProtocol: encode() -> (N, r, D) at the budget (queries r_q vectors, documents
    r_c), similarity() = MaxSim. `cache` (shared between encoders of other budgets) holds each
    input's full (R, D) embedding, so every budget is served by one encoding. maxsim: the pair
    (maxsim, maxsim_pairwise) of maxsim.py, given by the caller (the machinery imports nothing above it)."""

    def __init__(self, model, maxsim, budget=(16, 64), cache=None, name=None, training_datasets=None, batch_size=16):
        from mteb.models.model_meta import ModelMeta, ScoringFunction
        self.model, self.budget, self.batch_size = model, tuple(budget), batch_size
        self.maxsim, self.maxsim_pairwise = maxsim
        self.cache = {} if cache is None else cache
        self.encoded = 0                                # inputs actually run through the model
        self.mteb_model_meta = ModelMeta(
            loader=None, name=name or "metaembed/offline-tiny", revision=f"budget-{budget[0]}x{budget[1]}",
            release_date=None, languages=None, n_parameters=sum(p.numel() for p in model.parameters()),
            memory_usage_mb=None, max_tokens=None, embed_dim=model.dim, license=None, open_weights=True,
            public_training_code=None, public_training_data=None, framework=["PyTorch"], reference=None,
            similarity_fn_name=ScoringFunction.MAX_SIM, use_instructions=False,
            training_datasets=training_datasets, model_type=["late-interaction"], modalities=["image", "text"],
            experiment_kwargs={"budget": f"{budget[0]}x{budget[1]}"})

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None, **kwargs):
        query = getattr(prompt_type, "value", prompt_type) == "query"
        texts, images = [], []
        for batch in inputs:
            n = len(batch["text"] if "text" in batch else batch["image"])
            texts += list(batch["text"]) if "text" in batch else [""] * n
            images += [load_image(im) for im in batch["image"]] if "image" in batch else [None] * n
        side = "query" if query else "candidate"
        keys = [(side, t, image_key(im)) for t, im in zip(texts, images)]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if todo:
            where = {k: i for i, k in enumerate(keys)}
            sub_t = [texts[where[k]] for k in todo]
            sub_i = [images[where[k]] for k in todo]
            enc = self.model.encode_queries if query else self.model.encode_candidates
            out = enc(sub_t, sub_i if any(im is not None for im in sub_i) else None, batch_size=self.batch_size)
            self.cache.update(zip(todo, out))
            self.encoded += len(todo)
        r = self.budget[0] if query else self.budget[1]
        return torch.stack([self.cache[k][:r] for k in keys])           # (N, r, D)

    def similarity(self, a, b):
        return self.maxsim(torch.as_tensor(a).float(), torch.as_tensor(b).float())

    def similarity_pairwise(self, a, b):
        return self.maxsim_pairwise(torch.as_tensor(a).float(), torch.as_tensor(b).float()[:, None])[:, 0]


def training_datasets(checkpoint):
    """What the checkpoint was trained on, from its train_args.json, as mteb wants it (a set of
    names); the synthetic scenes and unknown sources are named as they are."""
    path = os.path.join(checkpoint, "train_args.json") if checkpoint else None
    if not path or not os.path.isfile(path):
        return None
    args = json.load(open(path))
    if args.get("mixture"):
        import yaml
        return set(yaml.safe_load(open(args["mixture"])))
    return {"MMEB-train/" + s for s in args.get("subsets") or []} or {args.get("data", "synthetic")}


def run(model, maxsim, tasks, budgets, out_dir, name=None, trained_on=None):
    """mteb.evaluate at every budget from one encoding; each budget's results in mteb's own layout
    under out_dir/<budget>/. -> {budget: {task name: {main score and ndcg_at_5 ...}}}."""
    import shutil

    from mteb.cache import ResultCache
    cache, out = {}, {}
    top = os.path.abspath(out_dir)                          # the first folder this run creates, if any
    while not os.path.exists(os.path.dirname(top)):
        top = os.path.dirname(top)
    fresh = [os.path.join(out_dir, f"{rq}x{rc}") for rq, rc in budgets]
    fresh = [d for d in [top] + fresh if not os.path.exists(d)]       # what this run creates
    try:
        for rq, rc in budgets:
            enc = MetaEmbedEncoder(model, maxsim, (rq, rc), cache, name, trained_on)
            result = mteb.evaluate(enc, tasks, cache=ResultCache(os.path.join(out_dir, f"{rq}x{rc}")),
                                   overwrite_strategy="always", show_progress_bar=False)
            out[f"{rq}x{rc}"] = {r.task_name: next(iter(r.scores.values()))[0] for r in result.task_results}
    except OSError as e:         # offline, a hub error (requests' errors are OSErrors): one line, nothing left
        for d in reversed(fresh):
            shutil.rmtree(d, ignore_errors=True)
        raise ValueError(f"mteb could not load the data of {', '.join(t.metadata.name for t in tasks)[:200]} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}): is the hub "
                         f"reachable, or the data set in the Hugging Face cache?") from None
    return out


def evaluate_for_table(model, maxsim, source, name, budgets, out_dir):
    """evaluate.py --mteb: an mteb benchmark or task by name, scored by mteb's own evaluator at every
    budget from one encoding (its results layout under out_dir/<budget>/) -> evaluate.py's results
    dict (tasks x budgets, headline NDCG@5, the summary), for its table and plot."""
    try:
        tasks = list(mteb.get_benchmark(name).tasks)
    except (KeyError, ValueError):
        try:
            tasks = list(mteb.get_tasks(tasks=[name]))
        except (KeyError, ValueError) as e:
            raise ValueError(f"--mteb {name}: neither an mteb benchmark nor a task ({str(e)[:200]})") from None
    t = time.time()
    folder = source if os.path.isdir(str(source)) else None
    scores = run(model, maxsim, tasks, budgets, out_dir, f"metaembed/{os.path.basename(str(source))}", training_datasets(folder))
    results = {"model": source, "benchmark": f"mteb {name}", "device": str(model.device), "dim": model.dim,
               "index_dtype": "float32", "budgets": [f"{a}x{b}" for a, b in budgets], "headline": "NDCG@5",
               "mteb_results": out_dir,
               "tasks": {task: {b: {"NDCG@5": scores[b][task]["ndcg_at_5"], "main_score": scores[b][task]["main_score"],
                                    "score_seconds": 0.0} for b in scores} for task in scores[next(iter(scores))]}}
    for task in results["tasks"].values():
        task["encode_seconds"] = (time.time() - t) / len(results["tasks"])
    results["summary"] = report.summarise(results, budgets, "NDCG@5", model.dim, 4, n_candidates=0)
    return results
