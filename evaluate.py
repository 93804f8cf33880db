"""
Evaluate MetaEmbed at every budget from ONE encoding pass: each query and candidate is encoded
once at (R_q, R_c), and a budget (r_q, r_c) is scored on the prefixes E_q[:r_q], E_c[:r_c].

    python evaluate.py --budgets 1,4,16,64                      # the offline run's checkpoint, synthetic
    python evaluate.py --checkpoint DIR --benchmark mmeb --mmeb TIGER-Lab/MMEB-eval --mmeb-images DIR
    python evaluate.py --checkpoint DIR --benchmark vidore --vidore vidore/docvqa_test_subsampled ...
    python evaluate.py --backbone tiny                          # untrained meta tokens, a baseline

Metrics: MMEB Precision@1 (each row against its own candidates, candidate 0 the positive);
ViDoRe NDCG@5 over the full corpus (and NDCG@10, Recall@1/5/10, P@1); synthetic P@1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import types

import torch

import data
from maxsim import maxsim, maxsim_pairwise, maxsim_topk, warm_up
from machinery import checks, hub, index, report, st_format
from machinery.backbones import image_key
from machinery.checkpoints import DEFAULT_CHECKPOINT
from machinery.precision import Precision, default_float
from machinery.precision import argument as precision_arg
from metaembed import Budget, MetaEmbed, ScoringOptions, load_model, parse_budgets


# -----------------------------------------------------------------------------
# metrics (trec_eval conventions)

def _ranked(docs):
    """Sort as trec_eval does: score descending, ties by document id descending."""
    return [d for d, _ in sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)]


def ndcg(run: dict, qrels: dict, k: int) -> float:
    """NDCG@k, linear gains (rel), log2 discount; mean over the queries of qrels (a query missing
    from the run scores 0); a fraction in [0, 1]."""
    total, n = 0.0, 0
    for qid, rels in qrels.items():
        ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
        if not ideal:
            continue
        n += 1
        ranked = _ranked(run.get(qid, {}))[:k]
        dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked))
        total += dcg / sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return total / n if n else 0.0


def recall(run: dict, qrels: dict, k: int) -> float:
    """Fraction of a query's relevant documents in its top k, mean over queries."""
    total, n = 0.0, 0
    for qid, rels in qrels.items():
        relevant = {d for d, r in rels.items() if r > 0}
        if relevant:
            n += 1
            total += len(relevant & set(_ranked(run.get(qid, {}))[:k])) / len(relevant)
    return total / n if n else 0.0


def retrieval_p_at_1(run: dict, qrels: dict) -> float:
    """Fraction of queries whose top-ranked document is relevant (trec_eval order)."""
    hits = [float(bool(run.get(q)) and qrels[q].get(_ranked(run[q])[0], 0) > 0) for q in qrels]
    return sum(hits) / len(hits) if hits else 0.0


def mmeb_p_at_1(scores: list[torch.Tensor]) -> float:
    """MMEB: per row, candidate 0 is the positive; a hit when it is the argmax, so a tie with it
    counts as a hit (VLM2Vec: argmax, then pred == 0; identical candidates score the same)."""
    hits = [float(s[0] >= s[1:].max()) if len(s) > 1 else 1.0 for s in scores]
    return sum(hits) / len(hits)


# -----------------------------------------------------------------------------
# every budget from one encoding

def encode_unique(model: MetaEmbed, items: list[tuple], side: str,
                  options: ScoringOptions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """items: list of (text, image) -> (embeddings (U, R, D), index per item (N,)). Equal items are
    encoded once. Queries: float32, in memory. Candidates: straight into a buffer in
    options.float_copy (or an on-disk index at options.index_path); options.precision int8 /
    binary: returned in that precision (on disk: the index's low-bit groups)."""
    options = options or ScoringOptions()
    query = side == "query"
    dtype, path, precision = (torch.float32, None, None) if query else \
        (options.float_copy.dtype, options.index_path, options.precision)
    keys, which, unique = {}, [], []
    for text, image in items:
        key = (text, image if isinstance(image, str) or image is None else id(image))
        if key not in keys:
            keys[key] = len(unique)
            unique.append((text, image))
        which.append(keys[key])
    texts, images = [t for t, _ in unique], [im for _, im in unique]
    images = None if all(im is None for im in images) else images
    R = model.config.num_query_tokens if side == "query" else model.config.num_candidate_tokens
    shape = (len(unique), R, model.dim)
    out = index.create(path, *shape, model.config.groups, str(dtype).removeprefix("torch."), precision) if path \
        else torch.empty(shape, dtype=dtype)
    enc = model.encode_queries if side == "query" else model.encode_candidates
    enc(texts, images, batch_size=options.batch_size, progress=options.progress, out=out, workers=options.workers)
    if precision in index.QUANTIZED:
        out = out.low_bits() if path else index.quantize(out, precision)
    return out, torch.tensor(which, dtype=torch.long)


def score_retrieval(model: MetaEmbed, task: dict, budgets: list[Budget], options: ScoringOptions | None = None,
                    k: int = 10) -> tuple[dict, float]:
    """One retrieval task (queries, corpus, qrels) at every budget -> ({Budget: metrics}, encoding
    seconds). The corpus is encoded once in options' precision (in memory, or on disk at
    options.index_path) and never copied whole: each budget streams prefix chunks of it to the
    scoring device."""
    options = options or ScoringOptions()
    t0 = time.time()
    qids, dids = list(task["queries"]), list(task["corpus"])
    Q, qi = encode_unique(model, [task["queries"][q] for q in qids], "query", options)
    C, ci = encode_unique(model, [task["corpus"][d] for d in dids], "candidate", options)   # (U, R_c, D), U unique
    Q = Q[qi].to(options.device)                                        # (N_q, R_q, D)
    docs_of = {}                                                        # unique row -> its doc ids
    for d, u in zip(dids, ci.tolist()):
        docs_of.setdefault(u, []).append(d)
    encode_s = time.time() - t0
    out = {}
    for b in map(Budget._make, budgets):
        rq, rc = b
        warm_up(Q[:, :rq], C[:, :rc], options.backend)                   # untimed: may measure the dispatch
        t1 = time.time()
        # top k unique candidates; identical documents share a score, so they expand to >= k docs
        scores, idx = maxsim_topk(Q[:, :rq], C[:, :rc], k, backend=options.backend)   # prefix views: no copy
        if options.device.type == "cuda":
            torch.cuda.synchronize()
        score_s = time.time() - t1
        scores, idx = scores.tolist(), idx.tolist()
        same = task.get("same_doc", {})                                 # rows of one document: merged by max
        run = {q: {} for q in qids}
        for a in range(len(qids)):
            for s, u in zip(scores[a], idx[a]):
                for d in docs_of[u]:
                    doc = same.get(d, d)
                    run[qids[a]][doc] = max(s, run[qids[a]].get(doc, s))
        qrels = task["qrels"]
        out[b] = {"NDCG@5": ndcg(run, qrels, 5), "NDCG@10": ndcg(run, qrels, 10),
                             "Recall@1": recall(run, qrels, 1), "Recall@5": recall(run, qrels, 5),
                             "Recall@10": recall(run, qrels, 10), "P@1": retrieval_p_at_1(run, qrels),
                             "score_seconds": score_s, "num_candidates": len(dids)}
    return out, encode_s


def heldout_task(source: torch.utils.data.Dataset) -> dict:
    """Held-out rows -> a retrieval task: each query against the held-out positives, identical
    ones (same text, same image) counted once, so a query is a hit when its top candidate has its
    positive's content (MMEB's tie rule; a classification source has a few labels among its rows)."""
    rows = [source[i] for i in range(len(source))]
    corpus, doc_of = {}, {}
    for r in rows:
        key = (r["pos_text"], image_key(r["pos_image"]))
        doc_of.setdefault(key, len(doc_of))
        corpus[doc_of[key]] = (r["pos_text"], r["pos_image"])
    return dict(queries={i: (r["qry_text"], r["qry_image"]) for i, r in enumerate(rows)}, corpus=corpus,
                qrels={i: {doc_of[(r["pos_text"], image_key(r["pos_image"]))]: 1} for i, r in enumerate(rows)})


@torch.no_grad()
def heldout_p_at_1(model: MetaEmbed, tasks: dict, groups: tuple, batch_size: int, device: torch.device) -> dict:
    """train.py --eval-every: P@1 on held-out rows at each Matryoshka group, mean over tasks (sources)."""
    if not tasks:
        return {}
    budgets = [Budget(*g) for g in groups]
    out = {b: 0.0 for b in budgets}
    for task in tasks.values():
        res, _ = score_retrieval(model, task, budgets, ScoringOptions(batch_size, precision="float32", device=device),
                                 k=1)
        for b in budgets:
            out[b] += res[b]["P@1"] / len(tasks)
    return {f"heldout_p1_{b}": p for b, p in out.items()}


def score_mmeb(model: MetaEmbed, rows: list[dict], budgets: list[Budget],
               options: ScoringOptions | None = None) -> tuple[dict, float]:
    """An MMEB subset: each row against its own candidates -> ({Budget: {"P@1": ...}}, encoding
    seconds). Candidates are held once each, in options' precision; each row's are moved to the
    scoring device as it is scored."""
    options = options or ScoringOptions()
    device = options.device
    t0 = time.time()
    Q, qi = encode_unique(model, [r["qry"] for r in rows], "query", options)
    flat = [c for r in rows for c in r["cands"]]
    C, ci = encode_unique(model, flat, "candidate", options)
    Q = Q.to(device)
    encode_s = time.time() - t0
    out, starts = {}, torch.tensor([0] + [len(r["cands"]) for r in rows]).cumsum(0)
    for b in map(Budget._make, budgets):
        rq, rc = b
        warm_up(Q[:1, :rq], C[:, :rc], options.backend)                  # untimed: may measure the dispatch
        t1 = time.time()
        per_row = [maxsim(Q[qi[i]][None, :rq], C[ci[starts[i]:starts[i + 1]], :rc].to(device), backend=options.backend)[0]
                   for i in range(len(rows))]
        out[b] = {"P@1": mmeb_p_at_1([s.cpu() for s in per_row]), "score_seconds": time.time() - t1}
    return out, encode_s


# -----------------------------------------------------------------------------
# CLI

def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="1,4,8,16,64",
                   help="comma list: k = the group with r_c = k, or AxB = (r_q, r_c) (default 1,4,8,16,64)")
    p.add_argument("--checkpoint", help=f"a checkpoint folder or a train.py --out folder (default: "
                   f"{DEFAULT_CHECKPOINT}, the offline run's)")
    p.add_argument("--backbone", help="evaluate an untrained model on this backbone instead (a baseline)")
    p.add_argument("--benchmark", default="synthetic", choices=["synthetic", "mmeb", "vidore"])
    p.add_argument("--mmeb", default="TIGER-Lab/MMEB-eval", help="MMEB-eval hub id or local folder")
    p.add_argument("--mmeb-images", help="folder MMEB-eval's image paths are relative to")
    p.add_argument("--subsets", nargs="+", help="MMEB subsets (default: all 36)")
    p.add_argument("--vidore", nargs="+", default=["vidore/docvqa_test_subsampled"],
                   help="ViDoRe data sets: hub ids or local folders (v1 QA or BEIR layout)")
    p.add_argument("--max-rows", type=int, help="cap rows per MMEB subset / queries per ViDoRe set")
    p.add_argument("--synthetic-scenes", type=int, default=300, help="synthetic eval scenes (each + 3 variants)")
    p.add_argument("--objects", help="synthetic squares per scene min,max (default: as trained)")
    p.add_argument("--batch-size", type=int, default=64, help="encoding batch size")
    p.add_argument("--workers", type=int, help="processes preparing batches (images, tokens) while the model "
                   "encodes; 0 = in the main process (default: 4 on a GPU, 0 on the CPU)")
    p.add_argument("--precision", type=precision_arg, choices=list(Precision), metavar="{" + ",".join(Precision) + "}",
                   help="how the candidates are held and scored (machinery/precision.py; bf16 = bfloat16): a float "
                   "dtype (default: bfloat16, as the paper; float32 under 128 dimensions, where bf16 reorders "
                   "near-ties), or int8 / binary (sign bits), each with a scale a vector; the query stays in float")
    p.add_argument("--index-dtype", type=precision_arg, choices=list(index.DTYPES),
                   help=argparse.SUPPRESS)   # deprecated: --precision; beside --precision int8 / binary, the float copy's
    p.add_argument("--index-dir", help="encode each corpus into an on-disk index here (DIR/<run>/<task>/), scored "
                   "chunk by chunk: host memory stays one chunk plus the model, for corpora larger than RAM")
    p.add_argument("--max-pixels", type=int, help="cap on an image's pixels (default: the checkpoint's; "
                   "real backbones 1024 visual tokens = 802816)")
    p.add_argument("--min-pixels", type=int, help="floor on an image's pixels (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic eval set and untrained models")
    p.add_argument("--mteb", metavar="NAME", help="instead: an mteb benchmark or task (e.g. 'ViDoRe(v1)'), scored by "
                   "mteb's own evaluator at every budget from one encoding (pip install 'mteb>=2.26,<3')")
    p.add_argument("--mteb-results", default="results/mteb", help="with --mteb: mteb's results folders, one a "
                   "budget (default results/mteb)")
    p.add_argument("--output", help="write every number as JSON here")
    p.add_argument("--plot", help="write a PNG of quality against budget and index size here")
    p.add_argument("--card", action="store_true", help="write the results table into the checkpoint's model card "
                   "(its README.md, the sentence-transformers folder's)")
    args = p.parse_args(argv)
    checks.at_least(p.error, args, batch_size=1, synthetic_scenes=1, max_rows=1, workers=0, max_pixels=1, min_pixels=1)
    checks.parses(p.error, "--objects", data.parse_objects, args.objects)
    if args.index_dir:
        checks.writable_dir(p.error, "--index-dir", args.index_dir)
    if args.card and args.backbone:
        p.error("--card writes into a checkpoint's model card: give --checkpoint, not --backbone")
    if args.index_dtype and args.precision and not args.precision.quantized and args.precision != args.index_dtype:
        p.error(f"--index-dtype {args.index_dtype} (the old spelling of --precision) disagrees with --precision "
                f"{args.precision}: give --precision alone")
    if args.mteb and args.precision and args.precision.quantized:
        p.error("--precision int8 / binary is for the project's own scoring, not --mteb (mteb scores its own way)")
    for flag, path in (("--output", args.output), ("--plot", args.plot)):   # checked before hours of encoding
        if path:
            checks.writable_file(p.error, flag, path)
    return args


def load_tasks(args: argparse.Namespace, train_args: dict) -> tuple[str, dict]:
    """The benchmark's tasks -> (headline metric, {name: (scorer, task)}), every data set checked
    before anything is encoded."""
    if args.benchmark == "synthetic":
        lo, hi = data.parse_objects(args.objects or train_args.get("objects", "%d,%d" % data.OBJECTS))
        tasks = data.synthetic_eval(args.synthetic_scenes, seed=args.seed, min_objects=lo, max_objects=hi)
        return "P@1", {name: (score_retrieval, task) for name, task in tasks.items()}
    if args.benchmark == "vidore":
        return "NDCG@5", {name: (score_retrieval, hub.load_vidore(path, args.max_rows))
                          for name, path in zip(hub.unique_names(args.vidore), args.vidore)}
    subsets = args.subsets or data.MMEB_SUBSETS
    unknown = [s for s in subsets if s not in data.MMEB_SUBSETS]
    if unknown:
        raise ValueError(f"unknown MMEB subset(s) {unknown}; the 36 are: {', '.join(data.MMEB_SUBSETS)}")
    return "P@1", {s: (score_mmeb, hub.load_mmeb_eval(args.mmeb, s, args.mmeb_images, args.max_rows)) for s in subsets}


def evaluate(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.backbone:
        model, source, train_args = MetaEmbed.from_backbone(args.backbone, seed=args.seed), f"untrained {args.backbone}", {}
    else:
        model, source = load_model(args.checkpoint or DEFAULT_CHECKPOINT, "evaluate.py",
                                   " (or pass --backbone tiny for an untrained baseline)")
        ta = os.path.join(source, "train_args.json")
        train_args = json.load(open(ta)) if os.path.isfile(ta) else {}
    if args.max_pixels or args.min_pixels:
        model.set_image_bounds(args.min_pixels, args.max_pixels)
    # one precision; a float one is the index's dtype, int8 / binary keep a float copy in the default's
    float_copy = args.precision if args.precision and not args.precision.quantized else \
        args.index_dtype or default_float(model.dim)
    precision = args.precision or float_copy
    dtype = float_copy.dtype
    budgets = parse_budgets(args.budgets, model.config)
    if args.mteb:  # mteb's own evaluator at every budget from one encoding, the table and plot over it
        return mteb_adapter().evaluate_for_table(model, (maxsim, maxsim_pairwise), source, args.mteb, budgets,
                                                 args.mteb_results)
    headline, tasks = load_tasks(args, train_args)
    model.to(device)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    results = {"model": source, "benchmark": args.benchmark, "device": str(device), "dim": model.dim,
               "index_dtype": float_copy, "precision": precision,
               "budgets": [str(b) for b in budgets], "tasks": {}}
    # --index-dir: this run's own folder in it, so runs sharing one --index-dir never mix files
    run_dir = tempfile.mkdtemp(prefix=f"run-{time.strftime('%Y%m%d-%H%M%S')}-", dir=args.index_dir) \
        if args.index_dir else None
    if run_dir:
        results["index_dir"] = run_dir
    options = ScoringOptions(args.batch_size, workers, True, precision, float_copy, device=device)
    for name, (scorer, task) in tasks.items():
        res, enc = scorer(model, task, budgets, dataclasses.replace(
            options, index_path=os.path.join(run_dir, name.replace("/", "--")) if run_dir else None))
        results["tasks"][name] = {**{str(b): m for b, m in res.items()}, "encode_seconds": enc}   # "AxB" keys: the JSON's
    results["headline"] = headline
    mmeb = {**data.MMEB_TASKS, "IND": [s for s in tasks if s not in data.MMEB_OOD],
            "OOD": [s for s in tasks if s in data.MMEB_OOD]} if args.benchmark == "mmeb" else None
    results["summary"] = report.summarise(results, budgets, headline, model.dim, dtype.itemsize,
                                          n_candidates=max((t[results["budgets"][0]].get("num_candidates", 0)
                                                            for t in results["tasks"].values()), default=0),
                                          task_groups=mmeb)
    return results


def mteb_adapter() -> types.ModuleType:  # optional: imported only here, its absence one line
    """machinery/mteb_adapter.py, or one line saying how to install mteb."""
    try:
        from machinery import mteb_adapter
    except ImportError:
        raise ValueError("--mteb and mteb_model need mteb: pip install 'mteb>=2.26,<3'") from None
    return mteb_adapter


def mteb_model(checkpoint_or_model: str | MetaEmbed, budget: str | tuple[int, int] = (16, 64)) -> object:
    """An object mteb.evaluate(model, tasks) accepts (mteb 2.x's encoder protocol; MaxSim through
    maxsim.maxsim) at one budget: a checkpoint folder (or train.py --out) or a MetaEmbed."""
    model, found = (checkpoint_or_model, None) if isinstance(checkpoint_or_model, MetaEmbed) else \
        load_model(checkpoint_or_model, "evaluate.py")
    budget = model.config.budget(budget)         # the one budget rule, before the encoder is built
    adapter = mteb_adapter()
    named = dict(name=f"metaembed/{os.path.basename(found)}",
                 training_datasets=adapter.training_datasets(found)) if found else {}
    return adapter.MetaEmbedEncoder(model, (maxsim, maxsim_pairwise), budget, **named)


def main(argv: list[str] | None = None) -> dict:
    args = get_args(argv)
    try:
        results = evaluate(args)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    report.print_table(results)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.output}")
    if args.plot:
        report.plot(results, args.plot)
        print(f"wrote {args.plot}")
    if args.card:
        try:
            st_format.write_results(results["model"], results)
        except (ValueError, OSError) as e:
            sys.exit(f"evaluate.py: error: --card: {e}")
        print(f"wrote the results into {os.path.join(results['model'], st_format.CARD_FILE)}")
    return results


if __name__ == "__main__":
    main()
