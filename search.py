"""
Search a corpus with MetaEmbed at any budget: encode it once, then choose per query how many
vectors to spend, exhaustively or as a cascade (cheap budget over everything, fine budget on the
best few), on this machine or on Qdrant when the corpus outgrows it.

    python search.py index --checkpoint out/tiny-synthetic --out index/scenes      # the synthetic scenes
    python search.py query --index index/scenes "red top left, blue center" --budget 2x4 -k 5
    python search.py index --checkpoint CK --out INDEX --images DIR     # or --texts FILE.jsonl, --pdf FILE_OR_DIR
    python search.py query --index INDEX "a query" --first 1x1 --depth 1000 --budget 16x64
    python search.py index ... --qdrant PATH_OR_URL     # also into Qdrant (local folder, or a server's URL)
    python search.py query --index INDEX --qdrant PATH_OR_URL "a query" --first 1x1 --depth 1000 --budget 8x16

The index folder: index.json (the model, sizes, dtype), items.jsonl (id and source of each item),
and the candidate vectors stored group by group, group-A-B.bin holding vectors A+1..B of every
candidate (N x (B - A) x D, machinery/index.py's format: bf16 from D = 128, float32 below): a
search at r_c reads exactly the first r_c / R_c of the bytes, each group contiguously. Indexing is resumable: shards are marked
done atomically, a rerun continues where it stopped, and index.json (which `query` needs) is
written last, so an interrupted run never leaves an index that looks complete. A corrupt image
among many is skipped, listed in skipped.jsonl and never returned.
"""
import argparse
import json
import os
import sys
import time

import torch

from kernels import maxsim, maxsim_topk
from machinery import index as on_disk
from machinery.checkpoints import DEFAULT_CHECKPOINT, write_atomic
from machinery.checkpoints import load_model as load_model_at
from metaembed import parse_budgets

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHARD = 256          # items encoded and marked done together


# -----------------------------------------------------------------------------
# the index: the vectors in machinery/index.py's format, plus the items and the model

class Index:
    """A budget-aware index of N candidates x R_c vectors of size D, grouped on disk (see above).

    index.budget(r_c) (r_c a group boundary) slices like an (N, r_c, D) tensor, read from the
    group files; index.search scores queries against it."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(os.path.join(self.path, "index.json")):
            raise FileNotFoundError(f"{self.path!r} is not a finished index (no index.json): run `search.py index` "
                                    f"(again, to finish an interrupted one)")
        self.vectors = on_disk.open_vectors(self.path)
        self.meta, self.N, self.R_c, self.D = self.vectors.meta, self.vectors.N, self.vectors.R_c, self.vectors.D
        self.bounds = self.vectors.bounds
        with open(os.path.join(self.path, "items.jsonl")) as f:
            self.items = [json.loads(line) for line in f]
        self.skipped = {i for i, it in enumerate(self.items) if it.get("skipped")}

    def budget(self, r_c):
        if r_c not in [b for _, b in self.bounds]:
            raise ValueError(f"budget r_c={r_c} is not stored in {self.path}: the index holds r_c in "
                             f"{', '.join(str(b) for _, b in self.bounds)}")
        return self.vectors.budget(r_c)

    def search(self, q, budget, k=10, first=None, depth=1000, backend=None):
        """q (N_q, R_q, D) -> (scores (N_q, k), item indices (N_q, k)), best first. budget (r_q, r_c);
        with first: score every candidate at `first`, then the best `depth` at `budget`."""
        k_all = k + len(self.skipped)                  # skipped items are dropped from the results
        if first is None:
            s, i = maxsim_topk(q[:, :budget[0]], self.budget(budget[1]), min(k_all, self.N), backend=backend)
        else:
            _, cand = maxsim_topk(q[:, :first[0]], self.budget(first[1]), min(max(depth, k_all), self.N),
                                  backend=backend)
            view, out_s, out_i = self.budget(budget[1]), [], []
            for a in range(0, q.shape[0], 16):      # 16 queries at a time: their candidates read once
                block = cand[a:a + 16]                                        # (n, depth)
                rows, where = torch.unique(block, return_inverse=True)       # sorted: sequential reads
                s = maxsim(q[a:a + 16, :budget[0]], view[rows.numpy()], backend=backend)   # (n, U)
                s = s.gather(1, where)                                        # (n, depth): each its own
                s, pos = s.topk(min(k_all, s.shape[1]), dim=1)
                out_s.append(s)
                out_i.append(block.gather(1, pos))
            s, i = torch.cat(out_s), torch.cat(out_i)
        keep = [[(float(x), int(j)) for x, j in zip(sr, ir) if int(j) not in self.skipped][:k] for sr, ir in zip(s, i)]
        return (torch.tensor([[x for x, _ in r] for r in keep]), torch.tensor([[j for _, j in r] for r in keep],
                                                                              dtype=torch.long))


# -----------------------------------------------------------------------------
# building an index

def list_items(args):
    """-> [(id, text, image, source)] from --images, --texts, --pdf or the synthetic scenes."""
    if args.images:
        if not os.path.isdir(args.images):
            raise FileNotFoundError(f"--images {args.images}: no such folder")
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(args.images) for f in fs
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f"--images {args.images}: no image files in it ({', '.join(IMAGE_EXTENSIONS)})")
        return [(os.path.relpath(f, args.images), "", f, f) for f in files]
    if args.texts:
        items = []
        with open(args.texts) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        r = json.loads(line)
                        items.append((str(r.get("id", n)), r["text"], None, r["text"][:200]))
                    except (ValueError, KeyError, TypeError):
                        raise ValueError(f"--texts {args.texts} line {n}: expected a JSON object with 'text' "
                                         f"(and optionally 'id')") from None
        if not items:
            raise ValueError(f"--texts {args.texts}: no items in it")
        return items
    if args.pdf:
        return pdf_pages(args.pdf, args.max_pixels)
    import data                                   # the offline default: the synthetic eval scenes
    tasks = data.synthetic_eval(args.synthetic_scenes, seed=0)
    captions = tasks["i2t"]["corpus"]                            # the same scenes, as text
    return [(d, "", im, captions[d][0]) for d, (_, im) in tasks["t2i"]["corpus"].items()]


def pdf_pages(path, max_pixels):
    """Every page of a PDF (or of every PDF in a folder), rendered with pypdfium2 at the resolution
    that fills the model's image cap, decoded lazily."""
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise ImportError("--pdf needs pypdfium2: pip install pypdfium2") from None
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.lower().endswith(".pdf"))
    if not files:
        raise ValueError(f"--pdf {path}: no PDF there")
    items = []
    for f in files:
        try:
            n = len(pdfium.PdfDocument(f))
        except pdfium.PdfiumError as e:
            raise ValueError(f"--pdf: cannot open {f}: {e}") from None
        items += [(f"{os.path.basename(f)}#p{p + 1}", "", _PdfPage(f, p, max_pixels), f"{f} page {p + 1}")
                  for p in range(n)]
    return items


class _PdfPage:
    def __init__(self, file, page, max_pixels):
        self.file, self.page, self.max_pixels = file, page, max_pixels

    def __call__(self):
        import pypdfium2 as pdfium
        page = pdfium.PdfDocument(self.file)[self.page]
        w, h = page.get_size()                                       # points (1/72 inch)
        scale = min(4.0, (self.max_pixels / (w * h)) ** 0.5)         # fill the cap, no more
        return page.render(scale=scale).to_pil().convert("RGB")


def build_index(model, items, out, batch_size=32, progress=True):
    """Encode items into the index folder `out`, resumably (shards marked done in progress.json)."""
    os.makedirs(out, exist_ok=True)
    N, R_c, D = len(items), model.config.num_candidate_tokens, model.dim
    listing = [{"id": i, "source": s if isinstance(s, str) else str(s)} for i, _, _, s in items]
    state_file = os.path.join(out, "progress.json")
    state = json.load(open(state_file)) if os.path.isfile(state_file) else None
    if state and (state["items"] != listing or state["dim"] != D or state["model"] != model.config.backbone):
        raise ValueError(f"{out} holds an unfinished index of other items or another model: remove it, or "
                         f"index into another --out")
    if state is None:
        if os.path.isfile(os.path.join(out, "index.json")):
            raise ValueError(f"{out} already holds an index: remove it or choose another --out")
        vectors = on_disk.create(out, N, R_c, D, model.config.groups, on_disk.default_dtype(D))
        state = {"items": listing, "dim": D, "model": model.config.backbone, "vectors": vectors.meta,
                 "done": [], "skipped": []}
        write_atomic(state_file, json.dumps(state))
    vectors = on_disk.Vectors(out, state["vectors"])
    todo = [s for s in range(0, N, SHARD) if s not in state["done"]]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=N, initial=N - sum(min(SHARD, N - s) for s in todo), desc="index", unit="item")
    for s in todo:
        chunk = items[s:s + SHARD]
        try:
            model.encode_candidates([t for _, t, _, _ in chunk], [im for _, _, im, _ in chunk],
                                    batch_size=batch_size, out=vectors.rows(s, len(chunk)))
        except (FileNotFoundError, ValueError):   # an unreadable image: encode one by one, skip the bad ones
            for n, (_, t, im, src) in enumerate(chunk):
                try:
                    model.encode_candidates([t], [im], batch_size=1, out=vectors.rows(s + n, 1))
                except (FileNotFoundError, ValueError) as e:
                    state["skipped"].append({"item": s + n, "source": str(src), "error": str(e)[:300]})
        state["done"].append(s)
        write_atomic(state_file, json.dumps(state))            # atomically: this shard is done
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    skipped = {r["item"] for r in state["skipped"]}
    write_atomic(os.path.join(out, "items.jsonl"), "".join(
        json.dumps({**it, **({"skipped": True} if n in skipped else {})}) + "\n" for n, it in enumerate(listing)))
    write_atomic(os.path.join(out, "skipped.jsonl"), "".join(json.dumps(r) + "\n" for r in state["skipped"]))
    on_disk.write_meta(out, {**vectors.meta, "num_query_tokens": model.config.num_query_tokens,
                             "model_groups": model.config.groups, "checkpoint": model.source,
                             "backbone": model.config.backbone, "skipped": len(skipped)})
    os.remove(state_file)
    return state["skipped"]


# -----------------------------------------------------------------------------
# Qdrant: sharded, replicated, HNSW on the first vector, native multivector MaxSim

def qdrant_client(where):
    try:
        from qdrant_client import QdrantClient
    except ImportError:
        raise ImportError("--qdrant needs qdrant-client: pip install qdrant-client") from None
    return QdrantClient(url=where) if where.startswith(("http://", "https://")) else QdrantClient(path=where)


def to_qdrant(index, client, collection="metaembed", batch=256):
    """One point per candidate: a dense vector 'first' (E_c[0], for HNSW) and one multivector
    'mv{r_c}' (MAX_SIM over the first r_c vectors) per stored budget."""
    from qdrant_client import models
    dot = models.Distance.DOT
    mv = models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)
    if client.collection_exists(collection):
        client.delete_collection(collection)
    client.create_collection(collection, vectors_config={
        "first": models.VectorParams(size=index.D, distance=dot),
        **{f"mv{b}": models.VectorParams(size=index.D, distance=dot, multivector_config=mv) for _, b in index.bounds}})
    full = index.budget(index.R_c)
    for s in range(0, index.N, batch):
        E = full[s:s + batch].float().numpy()                         # (n, R_c, D)
        client.upsert(collection, [models.PointStruct(
            id=s + n, vector={"first": e[0].tolist(), **{f"mv{b}": e[:b].tolist() for _, b in index.bounds}},
            payload=index.items[s + n]) for n, e in enumerate(E) if s + n not in index.skipped])


def qdrant_search(client, q, budget, k, depth=None, collection="metaembed"):
    """q (R_q, D): MaxSim at budget over all points, or over the `depth` nearest by the first
    vector (HNSW prefetch). -> [(score, point id)]."""
    from qdrant_client import models
    if not client.collection_exists(collection):
        raise ValueError(f"Qdrant has no collection {collection!r} there: write it with `search.py index ... --qdrant`")
    prefetch = models.Prefetch(query=q[0].tolist(), using="first", limit=depth) if depth else None
    r = client.query_points(collection, prefetch=prefetch, query=q[:budget[0]].tolist(), using=f"mv{budget[1]}",
                            limit=k, with_payload=False)
    return [(p.score, p.id) for p in r.points]


# -----------------------------------------------------------------------------
# CLI

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("index", help="encode a corpus into an index folder")
    i.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a checkpoint or train.py --out folder "
                   "(default: the offline run's)")
    i.add_argument("--out", required=True, help="the index folder")
    src = i.add_mutually_exclusive_group()
    src.add_argument("--images", help="a folder of images (searched recursively)")
    src.add_argument("--texts", help="a JSONL file, one {\"id\": ..., \"text\": ...} a line")
    src.add_argument("--pdf", help="a PDF, or a folder of PDFs: one item per page")
    i.add_argument("--synthetic-scenes", type=int, default=300, help="with no corpus given: this many synthetic "
                   "eval scenes (and 3 variants of each)")
    i.add_argument("--batch-size", type=int, default=32)
    i.add_argument("--qdrant", help="also write the index into Qdrant: a local folder, or a server's http(s) URL")
    i.add_argument("--collection", default="metaembed", help="the Qdrant collection (default metaembed)")
    q = sub.add_parser("query", help="search an index")
    q.add_argument("text", nargs="?", default="", help="the query text")
    q.add_argument("--index", required=True, help="an index folder written by `search.py index`")
    q.add_argument("--image", help="a query image (with or without text)")
    q.add_argument("--budget", default="16x64", help="r_q x r_c (or a number: the group with that r_c; default 16x64)")
    q.add_argument("--first", help="cascade: score everything at this cheaper budget first (e.g. 1x1)")
    q.add_argument("--depth", type=int, default=1000, help="with --first: re-score the best N (with --qdrant: "
                   "the N nearest by the first vector, from Qdrant's HNSW)")
    q.add_argument("-k", type=int, default=10, help="results to print")
    q.add_argument("--json", action="store_true", help="print the results as JSON")
    q.add_argument("--qdrant", help="search Qdrant instead (a local folder or a URL) with the index's model")
    q.add_argument("--collection", default="metaembed")
    args = p.parse_args(argv)
    for k in ("batch_size", "synthetic_scenes", "depth", "k"):
        if getattr(args, k, 1) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1")
    return args


def load_model(path):
    model, found = load_model_at(path, "search.py")
    model.source = os.path.abspath(found)
    return model


def index_cmd(args):
    model = load_model(args.checkpoint)
    args.max_pixels = model.config.max_pixels or model.processor.image_processor.size["longest_edge"]
    items = list_items(args)
    t = time.time()
    skipped = build_index(model, items, args.out, args.batch_size)
    index = Index(args.out)
    print(f"indexed {index.N - len(skipped)} items in {time.time() - t:.1f}s into {args.out} "
          f"({sum(os.path.getsize(f) for f in index.vectors.files) / 2**20:.1f} MiB {index.meta['dtype']}; "
          f"budgets r_c {', '.join(str(b) for _, b in index.bounds)})")
    for r in skipped:
        print(f"skipped item {r['item']} ({r['source']}): {r['error']}")
    if args.qdrant:
        to_qdrant(index, qdrant_client(args.qdrant), args.collection)
        print(f"wrote {index.N - len(skipped)} points to Qdrant at {args.qdrant}, collection {args.collection}")


def query_cmd(args):
    index = Index(args.index)
    model = load_model(index.meta["checkpoint"])
    if model.config.backbone != index.meta["backbone"] or model.dim != index.D or \
            model.config.num_candidate_tokens != index.R_c:
        raise ValueError(f"the index was built by another model than {index.meta['checkpoint']} now holds")
    groups = tuple(tuple(g) for g in index.meta["model_groups"])
    budget = parse_budgets(args.budget, groups, index.meta["num_query_tokens"], index.R_c)[0]
    first = parse_budgets(args.first, groups, index.meta["num_query_tokens"], index.R_c)[0] if args.first else None
    if not args.text and not args.image:
        raise ValueError("a query needs a text or an --image (or both)")
    t = time.time()
    q = model.encode_queries([args.text], [args.image] if args.image else None)       # (1, R_q, D)
    t_enc, t = time.time() - t, time.time()
    if args.qdrant:   # with --first, the cheap stage is Qdrant's HNSW on the first vector
        hits = qdrant_search(qdrant_client(args.qdrant), q[0].numpy(), budget, args.k,
                             args.depth if first else None, args.collection)
    else:
        s, i = index.search(q, budget, args.k, first, args.depth, os.environ.get("METAEMBED_MAXSIM"))
        hits = list(zip(s[0].tolist(), i[0].tolist()))
    t_search = time.time() - t
    results = [{"rank": r + 1, "score": s, **index.items[j]} for r, (s, j) in enumerate(hits)]
    if args.json:
        print(json.dumps({"query": args.text, "image": args.image, "budget": f"{budget[0]}x{budget[1]}",
                          "first": f"{first[0]}x{first[1]}" if first else None, "results": results,
                          "encode_ms": 1e3 * t_enc, "search_ms": 1e3 * t_search}, indent=2))
        return results
    how = f"{first[0]}x{first[1]} over {index.N}, then {budget[0]}x{budget[1]} on the best {args.depth}" if first \
        else f"{budget[0]}x{budget[1]} over {index.N}"
    print(f"{how}{' (Qdrant)' if args.qdrant else ''}: encoded in {1e3 * t_enc:.0f} ms, "
          f"searched in {1e3 * t_search:.1f} ms")
    for r in results:
        print(f"{r['rank']:>3}  {r['score']:8.4f}  {r['id']}  {r['source']}")
    return results


def main(argv=None):
    args = get_args(argv)
    try:
        return index_cmd(args) if args.command == "index" else query_cmd(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"search.py: error: {e}")


if __name__ == "__main__":
    main()
