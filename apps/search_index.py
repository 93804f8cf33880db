"""
Search at any budget: an index of a corpus, the cascade, Qdrant.

The index folder: index.json (the model, sizes, dtype), items.jsonl (id and source of each item),
and the candidate vectors stored group by group, group-A-B.bin holding vectors A+1..B of every
candidate (N x (B - A) x D, machinery/index.py's format: bf16 from D = 128, float32 below): a
search at r_c reads exactly the first r_c / R_c of the bytes, each group contiguously. An int8 or
binary index (--precision) holds each group once more in that precision: searches read those
(a quarter / a sixteenth of bf16's bytes, plus a scale a vector), and a cascade rescores its best
`depth` from the float copy kept beside them. Indexing is resumable: shards are marked
done atomically, a rerun continues where it stopped, and index.json (which `query` needs) is
written last, so an interrupted run never leaves an index that looks complete. A corrupt image
among many is skipped, listed in skipped.jsonl and never returned.
"""
import json
import math
import os
import stat
import sys
import uuid

import torch

from machinery import index as on_disk
from machinery.backbones import max_text_tokens
from machinery.checkpoints import write_atomic
from machinery.precision import Precision, default_float
from maxsim import maxsim, maxsim_topk
from metaembed import MetaEmbedConfig, budget_groups

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHARD = 256          # items encoded and marked done together
REQUIRED = ("num_query_tokens", "model_groups", "checkpoint", "fingerprint")   # what search.py adds to index.json


# -----------------------------------------------------------------------------
# the index: the vectors in machinery/index.py's format, plus the items and the model

class Index:
    """A budget-aware index of N candidates x R_c vectors of size D, grouped on disk (see above).

    index.prefix(r_c) (r_c a group boundary) slices like an (N, r_c, D) tensor, read from the
    group files (index.prefix(r_c, index.precision): the int8 / binary ones); index.search scores
    queries against it."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(os.path.join(self.path, "index.json")):
            raise FileNotFoundError(f"{self.path!r} is not a finished index (no index.json): run `search.py index` "
                                    f"(again, to finish an interrupted one)")
        self.stamp = on_disk.stamp(self.path)           # what the files were when opened (see changed())
        self.vectors = on_disk.open_vectors(self.path, REQUIRED)
        self.meta, self.N, self.R_c, self.D = self.vectors.meta, self.vectors.N, self.vectors.R_c, self.vectors.D
        self.bounds, self.precision = self.vectors.bounds, self.vectors.precision
        with open(os.path.join(self.path, "items.jsonl")) as f:
            self.items = [json.loads(line) for line in f]
        if len(self.items) != self.N or any(it.get("n", n) != n for n, it in enumerate(self.items)):
            raise ValueError(f"index {self.path}: items.jsonl lists {len(self.items)} items"
                             f"{' out of order' if len(self.items) == self.N else ''}, index.json {self.N}: the "
                             f"labels would not match the vectors; rebuild the index")
        self.skipped = {i for i, it in enumerate(self.items) if it.get("skipped")}

    @property
    def checkpoint(self):
        """The checkpoint the index was built with: its path as built, or where that is gone (a fresh
        clone, a moved pair of folders) the same path relative to the index folder."""
        where, rel = self.meta["checkpoint"], self.meta.get("checkpoint_rel")
        near = os.path.normpath(os.path.join(self.path, rel)) if rel else None
        return near if near and os.path.exists(near) and not os.path.exists(where) else where

    def changed(self):
        """A line naming what changed on disk since the index was opened (another index written in
        its place, a file replaced or truncated), or None."""
        return None if on_disk.stamp(self.path) == self.stamp else \
            f"index {self.path} changed on disk since it was opened (rebuilt or replaced)"

    def prefix(self, r_c, precision=None):
        """The first r_c vectors of every candidate: the float copy, or (precision = the index's
        int8 / binary) the low-bit groups."""
        if r_c not in [b for _, b in self.bounds]:
            raise ValueError(f"r_c={r_c} is not stored in {self.path}: the index holds r_c in "
                             f"{', '.join(str(b) for _, b in self.bounds)}")
        return self.vectors.prefix(r_c, precision)

    def search(self, q, budget, k=10, first=None, depth=1000, backend=None, precision=None, exact=False):
        """q (N_q, R_q, D) -> (scores (N_q, k), item indices (N_q, k)), best first. budget (r_q, r_c);
        with first: score every candidate at `first`, then the best `depth` at `budget`.
        precision: the vectors of the one stage, or the cascade's first (default: the index's own,
        int8 / binary where it holds them); a cascade rescores from the float copy. exact: float32
        math only (maxsim's exact)."""
        k_all = k + len(self.skipped)                  # skipped items are dropped from the results
        precision = precision or self.precision
        if first is None:
            s, i = maxsim_topk(q[:, :budget[0]], self.prefix(budget[1], precision), min(k_all, self.N),
                               backend=backend, exact=exact)
        else:
            _, cand = maxsim_topk(q[:, :first[0]], self.prefix(first[1], precision), min(max(depth, k_all), self.N),
                                  backend=backend, exact=exact)
            view, out_s, out_i = self.prefix(budget[1]), [], []
            for a in range(0, q.shape[0], 16):      # 16 queries at a time: their candidates read once
                block = cand[a:a + 16]                                        # (n, depth)
                rows, where = torch.unique(block, return_inverse=True)       # sorted: sequential reads
                s = maxsim(q[a:a + 16, :budget[0]], view[rows.numpy()], backend=backend, exact=exact)   # (n, U)
                s = s.gather(1, where)                                        # (n, depth): each its own
                s, pos = s.topk(min(k_all, s.shape[1]), dim=1)
                out_s.append(s)
                out_i.append(block.gather(1, pos))
            s, i = torch.cat(out_s), torch.cat(out_i)
        keep = [[(float(x), int(j)) for x, j in zip(sr, ir) if int(j) not in self.skipped][:k] for sr, ir in zip(s, i)]
        damaged = sorted({j for r in keep for x, j in r if not math.isfinite(x)})
        if damaged:   # a NaN or inf in a stored vector: never returned as a score
            named = ", ".join(f"{j} ({self.items[j]['id']})" for j in damaged[:5])
            raise ValueError(f"index {self.path}: item(s) {named} "
                             f"score NaN or inf (their vectors are damaged): run `search.py verify {self.path}`, "
                             f"then rebuild the index")
        return (torch.tensor([[x for x, _ in r] for r in keep]), torch.tensor([[j for _, j in r] for r in keep],
                                                                              dtype=torch.long))


def check_depth(first, depth, flag="--"):
    """The cascade's rule that needs no index: a depth only with a first budget (search.py's argument
    parser uses it too, so the command line says it before anything is opened)."""
    if depth is not None and first is None:
        example = "--first 1x1 --depth 300" if flag else "first=1x1&depth=300"
        raise ValueError(f"{flag}depth is the cascade's: give {flag}first too (e.g. {example})")


def index_config(meta):
    """The model's budget rule as an index's index.json records it (its groups, R_q and R_c)."""
    return MetaEmbedConfig(num_query_tokens=meta["num_query_tokens"], num_candidate_tokens=meta["num_candidate_tokens"],
                           groups=meta["model_groups"])


def stored_r_c(meta):
    """The r_c an index stores (the ends of its group files): a budget's r_c must be one of them."""
    return [b for _, b in meta["groups"]]


def stored_budgets(meta):
    """The budgets an index holds, cheapest first: the model's groups (and the paper's that fit, see
    metaembed.budget_groups) whose r_c it stores; any r_q x r_c a search can take is plan()'s."""
    stored = set(stored_r_c(meta))
    return sorted((g for g in budget_groups(meta["model_groups"], meta["num_query_tokens"], meta["num_candidate_tokens"])
                   if g.r_c in stored), key=lambda g: (g.r_c, g.r_q))


def plan(meta, budget, first=None, depth=None, k=10, flag="--"):
    """The one reading of a search's budgets, for search.py query and the server alike: budget and
    first (specs, by the one budget rule, MetaEmbedConfig.budget, against the index's model and stored groups),
    the cascade's checks (first cheaper than budget, depth only with first) -> (budget, first, depth).
    flag: how the parameters are named to the user ("--" on the command line, "" in the API)."""
    config, stored = index_config(meta), stored_r_c(meta)
    budget = config.budget(budget, stored, f"{flag}budget")
    first = config.budget(first, stored, f"{flag}first") if first is not None else None
    check_depth(first, depth, flag)
    if first and (first.r_q > budget.r_q or first.r_c > budget.r_c):
        raise ValueError(f"{flag}first {first} is not cheaper than {flag}budget {budget}: "
                         f"the cascade scores everything at the cheap budget first")
    return budget, first, (max(depth or 1000, k) if first else None)


# -----------------------------------------------------------------------------
# building an index

def list_items(args, model=None):
    """-> ([(id, text, image, source)], [unreadable inputs {source, error}]) from --images, --texts,
    --pdf or the synthetic scenes. What cannot be an item (a FIFO, a file that is no PDF) is listed
    and skipped; what no item can come from at all is one line."""
    if args.images:
        return image_files(args.images), []
    if args.texts:
        return text_lines(args.texts, model), []
    if args.pdf:
        return pdf_pages(args.pdf, args.max_pixels)
    import data                                   # the offline default: the synthetic eval scenes
    tasks = data.synthetic_eval(args.synthetic_scenes, seed=0)
    captions = tasks["i2t"]["corpus"]                            # the same scenes, as text
    return [(d, "", im, captions[d][0]) for d, (_, im) in tasks["t2i"]["corpus"].items()], []


def walk(root, keep):
    """Regular files under root whose names pass keep, sorted; symlinked folders followed, each
    real folder once (a link back up cannot loop); FIFOs, sockets and devices never opened."""
    seen, out = set(), []
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        out += [os.path.join(folder, f) for f in files if keep(f) and stat.S_ISREG(os.stat(os.path.join(folder, f)).st_mode)]
    return sorted(out)


def image_files(folder):
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images {folder}: no such folder")
    files = walk(folder, lambda f: f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"--images {folder}: no image files in it ({', '.join(IMAGE_EXTENSIONS)})")
    return [(os.path.relpath(f, folder), "", f, f) for f in files]


def text_lines(path, model=None):
    """A JSONL file, one {"id": ..., "text": ...} a line (a UTF-8 byte-order mark allowed). A text
    longer than the model's positions is cut to fit, and said once."""
    if not os.path.isfile(path):
        raise ValueError(f"--texts {path}: not a file (give a JSONL file, one {{\"id\": ..., \"text\": ...}} a line)")
    items, cut, seen = [], 0, {}
    limit = max_text_tokens(model) if model is not None else None
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:
                r = None
            if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                raise ValueError(f"--texts {path} line {n}: expected a JSON object with 'text' (a string) "
                                 f"and optionally 'id'")
            if "id" in r and not isinstance(r["id"], (str, int)) or isinstance(r.get("id"), bool):
                raise ValueError(f"--texts {path} line {n}: 'id' must be a string or a whole number, not "
                                 f"{json.dumps(r['id'])[:40]}")
            key = str(r.get("id", n))
            if key in seen:
                raise ValueError(f"--texts {path} line {n}: id {key!r} is also line {seen[key]}'s: ids must be unique")
            seen[key] = n
            text = r["text"]
            if limit and len(text.encode()) > limit:       # tokens <= bytes: only long texts are tokenized
                ids = model.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(ids) > limit:
                    text, cut = model.processor.tokenizer.decode(ids[:limit]), cut + 1
            items.append((key, text, None, r["text"][:200]))
    if not items:
        raise ValueError(f"--texts {path}: no items in it")
    if cut:
        print(f"search.py: {cut} text(s) longer than the model's {limit} text tokens were cut to fit", file=sys.stderr)
    return items


def pdf_pages(path, max_pixels):
    """Every page of a PDF (or of every PDF in a folder), rendered with pypdfium2 at the resolution
    that fills the model's image cap, decoded lazily. A file that is not a PDF is listed, not fatal."""
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise ImportError("--pdf needs pypdfium2: pip install pypdfium2") from None
    if not os.path.exists(path):
        raise FileNotFoundError(f"--pdf {path}: no such file or folder")
    files = [path] if os.path.isfile(path) else walk(path, lambda f: f.lower().endswith(".pdf"))
    if not files:
        raise ValueError(f"--pdf {path}: no PDF there")
    items, unreadable = [], []
    for f in files:
        try:
            n = len(pdfium.PdfDocument(f))
        except pdfium.PdfiumError as e:
            if len(files) == 1:
                raise ValueError(f"--pdf: cannot open {f}: {e}") from None
            unreadable.append({"source": f, "error": f"not a readable PDF ({e})"})
            continue
        items += [(f"{os.path.basename(f)}#p{p + 1}", "", _PdfPage(f, p, max_pixels), f"{f} page {p + 1}")
                  for p in range(n)]
    if not items:
        raise ValueError(f"--pdf {path}: no readable page in {len(files)} file(s)")
    return items, unreadable


class _PdfPage:
    def __init__(self, file, page, max_pixels):
        self.file, self.page, self.max_pixels = file, page, max_pixels

    def __call__(self):
        import pypdfium2 as pdfium
        try:
            page = pdfium.PdfDocument(self.file)[self.page]
            w, h = page.get_size()                                       # points (1/72 inch)
            scale = min(4.0, (self.max_pixels / (w * h)) ** 0.5)         # fill the cap, no more
            return page.render(scale=scale).to_pil().convert("RGB")
        except (pdfium.PdfiumError, IndexError, ValueError) as e:        # a broken page: skipped, listed
            raise ValueError(f"page {self.page + 1} of {self.file} cannot be rendered ({e})") from None


def item_kind(image):
    """What an item is, for showing it later (search.py serve's thumbnails): an image file or a PDF
    page (their real paths, as indexed), a text, or a synthetic scene (redrawn from its caption)."""
    if isinstance(image, str):
        return {"kind": "image", "file": os.path.realpath(image)}
    if isinstance(image, _PdfPage):
        return {"kind": "pdf", "file": os.path.realpath(image.file), "page": image.page}
    return {"kind": "text"} if image is None else {"kind": "synthetic"}


def build_index(model, items, out, batch_size=32, progress=True, precision=None):
    """Encode items into the index folder `out`, resumably (shards marked done in progress.json);
    precision (any spelling of machinery/precision.py's): None, the float copy alone in the default
    dtype for D; float32 / bfloat16 / float16, the float copy in it; int8 / binary, those groups too,
    beside the float copy (machinery/index.py).
    The index records the checkpoint's fingerprint (its contents): a rerun with another model is
    refused, and so is a query once the checkpoint has changed."""
    N, R_c, D = len(items), model.config.num_candidate_tokens, model.dim
    precision = Precision.parse(precision, "--precision") if precision is not None else default_float(D)
    os.makedirs(out, exist_ok=True)
    listing = [{"n": n, "id": i, "source": s if isinstance(s, str) else str(s), **item_kind(im)}
               for n, (i, _, im, s) in enumerate(items)]
    state_file = os.path.join(out, "progress.json")
    state = json.load(open(state_file)) if os.path.isfile(state_file) else None
    if state and state.get("fingerprint") != model.fingerprint:
        raise ValueError(f"{out} holds an unfinished index encoded by checkpoint {state.get('checkpoint')} "
                         f"(fingerprint {state.get('fingerprint')}), not by {model.source} ({model.fingerprint}): "
                         f"resume with that checkpoint, or remove {out} to index afresh")
    if state and (state["items"] != listing or state["dim"] != D):
        raise ValueError(f"{out} holds an unfinished index of other items: remove it, or index into another --out")
    if state and on_disk.of_index(state["vectors"]) != precision:
        raise ValueError(f"{out} holds an unfinished index in precision {on_disk.of_index(state['vectors'])}: "
                         f"resume it with that --precision, or remove {out}")
    if state is None:
        if os.path.isfile(os.path.join(out, "index.json")):
            raise ValueError(f"{out} already holds an index: remove it or choose another --out")
        groups = budget_groups(model.config.groups, model.config.num_query_tokens, R_c)   # what a budget can name
        vectors = on_disk.create(out, N, R_c, D, groups, precision if not precision.quantized else default_float(D),
                                 precision)
        state = {"items": listing, "dim": D, "model": model.config.backbone, "vectors": vectors.meta,
                 "checkpoint": model.source, "fingerprint": model.fingerprint, "index_id": uuid.uuid4().hex,
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
                    said = str(e).replace(" (item 0)", "")        # the one-item batch's own numbering
                    state["skipped"].append({"item": s + n, "source": str(src), "error": said[:300]})
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
    if len(skipped) == N:
        raise ValueError(f"every one of the {N} items was skipped (see {out}/skipped.jsonl): nothing to index")
    on_disk.write_meta(out, {**vectors.meta, "num_query_tokens": model.config.num_query_tokens,
                             "model_groups": model.config.groups, "checkpoint": model.source,
                             "checkpoint_rel": os.path.relpath(model.source, out),
                             "fingerprint": model.fingerprint, "index_id": state["index_id"],
                             "backbone": model.config.backbone, "skipped": len(skipped),
                             "checksums": on_disk.checksums(vectors)})
    os.remove(state_file)
    return state["skipped"]


# -----------------------------------------------------------------------------
# verify: the files against their checksums, the items, the vectors' values

def verify(path):
    """-> the problems of an index folder, in words ([] if none)."""
    try:
        index = Index(path)
    except (ValueError, FileNotFoundError, KeyError) as e:
        return [str(e)]
    problems = []
    want = index.meta.get("checksums")
    if want is None:
        problems.append("index.json holds no checksums (built before they were written): rebuild to verify it")
    else:
        got = on_disk.checksums(index.vectors)
        problems += [f"{f} does not match its checksum: the file changed after indexing" for f in want if got.get(f) != want[f]]
    bad = [j for j in on_disk.non_finite_rows(index.vectors) if j not in index.skipped]
    if bad:
        named = ", ".join(f"{j} ({index.items[j]['id']})" for j in bad[:10])
        problems.append(f"{len(bad)} item(s) hold NaN or inf: {named}")
    return problems


# -----------------------------------------------------------------------------
# Qdrant: sharded, replicated, HNSW on the first vector, native multivector MaxSim. Every point
# carries the index's id and fingerprint, so a collection is tied to the index that wrote it.

def qdrant_client(where, collection=None, index=None, overwrite=False):
    """A client for a local folder or a server's URL, checked at once (unreachable, unwritable,
    held by another process: one line, before any encoding). With an index: its collection may
    be written (empty, or this index's own; another index's only with overwrite)."""
    try:
        from qdrant_client import QdrantClient
    except ImportError:
        raise ImportError("--qdrant needs qdrant-client: pip install qdrant-client") from None
    try:
        if where.startswith(("http://", "https://")):
            client = QdrantClient(url=where, timeout=10)
        else:
            if os.path.exists(where) and not os.path.isdir(where):
                raise ValueError("it is a file, not a folder")
            client = QdrantClient(path=where)
        exists = collection is not None and client.collection_exists(collection)
    except Exception as e:  # noqa: BLE001 - the client's many error types all mean "not usable here"
        raise ValueError(f"--qdrant {where}: cannot use it ({type(e).__name__}: {str(e)[:200]})") from None
    if exists and index is not None and not overwrite:
        owner = collection_owner(client, collection)
        if owner and owner != index["index_id"]:
            raise ValueError(f"Qdrant collection {collection!r} at {where} holds another index ({owner}): pass "
                             f"--overwrite to replace it, or --collection another name")
    return client


def collection_owner(client, collection):
    points, _ = client.scroll(collection, limit=1, with_payload=True, with_vectors=False)
    return points[0].payload.get("index_id") if points else None


def to_qdrant(index, client, collection="metaembed", batch=256, overwrite=False):
    """One point per candidate: a dense vector 'first' (E_c[0], for HNSW) and one multivector
    'mv{r_c}' (MAX_SIM over the first r_c vectors) per stored budget, with the index's id. An
    existing collection of this index is completed (upserts are idempotent), another's replaced
    only with overwrite."""
    from qdrant_client import models
    dot = models.Distance.DOT
    mv = models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)
    if client.collection_exists(collection):
        owner = collection_owner(client, collection)
        if owner not in (None, index.meta["index_id"]) and not overwrite:
            raise ValueError(f"Qdrant collection {collection!r} holds another index ({owner}): pass --overwrite")
        if owner != index.meta["index_id"]:
            client.delete_collection(collection)
    if not client.collection_exists(collection):
        client.create_collection(collection, vectors_config={
            "first": models.VectorParams(size=index.D, distance=dot),
            **{f"mv{b}": models.VectorParams(size=index.D, distance=dot, multivector_config=mv,
                                             quantization_config=qdrant_quantization(index.precision))
               for _, b in index.bounds}})
    full, tag = index.prefix(index.R_c), {"index_id": index.meta["index_id"], "fingerprint": index.meta["fingerprint"]}
    for s in range(0, index.N, batch):
        E = full[s:s + batch].float().numpy()                         # (n, R_c, D)
        points = [models.PointStruct(id=s + n, vector={"first": e[0].tolist(), **{f"mv{b}": e[:b].tolist()
                                                                                  for _, b in index.bounds}},
                                     payload={**index.items[s + n], **tag})
                  for n, e in enumerate(E) if s + n not in index.skipped]
        if points:                                 # a batch that was skipped whole has nothing to send
            client.upsert(collection, points)


def qdrant_quantization(precision):
    """Qdrant's own quantization of the multivectors for an int8 / binary index (None for bf16):
    scalar int8, or binary (one bit a number); its search rescores with the originals it keeps
    (qdrant_search asks for that), as the cascade rescores from the float copy here."""
    from qdrant_client import models
    if precision == "int8":
        return models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8,
                                                                                 always_ram=True))
    if precision == "binary":
        return models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True))
    return None


def check_collection(client, index, collection):
    """A query through Qdrant: the collection must be this index's, and whole."""
    if not client.collection_exists(collection):
        raise ValueError(f"Qdrant has no collection {collection!r} there: write it with "
                         f"`search.py push --index {index.path} --qdrant ...`")
    owner = collection_owner(client, collection)
    if owner != index.meta.get("index_id"):
        raise ValueError(f"Qdrant collection {collection!r} holds another index ({owner}), not {index.path}")
    have, want = client.count(collection, exact=True).count, index.N - len(index.skipped)
    if have != want:
        raise ValueError(f"Qdrant collection {collection!r} holds {have} of the index's {want} points (an upload "
                         f"cut short): complete it with `search.py push --index {index.path} --qdrant ...`")


def qdrant_search(client, q, budget, k, first=None, depth=None, collection="metaembed", rescore=False):
    """q (R_q, D): MaxSim at budget over all points, or over the `depth` best at `first` (1x1:
    the dense first vector, through HNSW; another budget: its multivector). rescore: the collection is
    quantized (an int8 / binary index): Qdrant rescores with the originals. -> [(score, point id)]."""
    from qdrant_client import models
    if not client.collection_exists(collection):
        raise ValueError(f"Qdrant has no collection {collection!r} there: write it with `search.py index ... --qdrant`")
    prefetch = None
    if first is not None:
        dense = first == (1, 1)
        prefetch = models.Prefetch(query=q[0].tolist() if dense else q[:first[0]].tolist(),
                                   using="first" if dense else f"mv{first[1]}", limit=depth)
    params = models.SearchParams(quantization=models.QuantizationSearchParams(rescore=True)) if rescore else None
    r = client.query_points(collection, prefetch=prefetch, query=q[:budget[0]].tolist(), using=f"mv{budget[1]}",
                            limit=k, with_payload=False, search_params=params)
    return [(p.score, p.id) for p in r.points]
