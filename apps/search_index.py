"""
Search at any budget: an index of a corpus, the cascade, Qdrant.

The index folder: index.json (the model, sizes, dtype), items.jsonl (id and source of each item),
and the candidate vectors stored group by group, group-A-B.bin holding vectors A+1..B of every
candidate (N x (B - A) x D, machinery/index.py's format: bf16 from D = 128, float32 below): a
search at r_c reads exactly the first r_c / R_c of the bytes, each group contiguously. An int8 or
binary index (--precision) holds each group once more in that precision: searches read those
(a quarter / a sixteenth of bf16's bytes, plus a scale a vector), and a cascade rescores its best
`depth` from the float copy kept beside them (or, where --keep-float dropped it, from the low
bits). Indexing is resumable: shards are marked
done atomically, a rerun continues where it stopped, and index.json (which `query` needs) is
written last, so an interrupted run never leaves an index that looks complete. A corrupt image
among many is skipped, listed in skipped.jsonl and never returned.
"""
import hashlib
import json
import math
import os
import shutil
import stat
import sys
import uuid

import numpy as np
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
        with open(os.path.join(self.path, "items.jsonl"), "rb") as f:
            raw = f.read()
        self.items = read_items(self.path, raw)
        if len(self.items) != self.N or any(it.get("n", n) != n for n, it in enumerate(self.items)):
            raise ValueError(f"index {self.path}: items.jsonl lists {len(self.items)} items"
                             f"{' out of order' if len(self.items) == self.N else ''}, index.json {self.N}: the "
                             f"labels would not match the vectors; rebuild the index")
        if "items_sha256" in self.meta and hashlib.sha256(raw).hexdigest() != self.meta["items_sha256"]:
            raise ValueError(f"index {self.path}: items.jsonl does not match its checksum in index.json (changed "
                             f"after indexing): run `search.py verify {self.path}`, then rebuild the index")
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

    def rescore_view(self, r_c):
        """What a cascade rescores from at r_c: the float copy, or the low bits where the index keeps
        no float copy of r_c vectors (--keep-float)."""
        self.prefix(r_c, self.precision)                 # r_c stored, or its one-line error
        return self.vectors.rescore_view(r_c)

    def search(self, q, budget, k=10, first=None, depth=1000, backend=None, precision=None, exact=False):
        """q (N_q, R_q, D) -> (scores (N_q, k), item indices (N_q, k)), best first. budget (r_q, r_c);
        with first: score every candidate at `first`, then the best `depth` at `budget`.
        precision: the vectors of the one stage, or the cascade's first (default: the index's own,
        int8 / binary where it holds them); a cascade rescores from the float copy, or from the low
        bits where the index keeps none at budget (--keep-float). exact: float32 math only (maxsim's exact)."""
        k_all = k + len(self.skipped)                  # skipped items are dropped from the results
        precision = precision or self.precision
        if first is None:
            s, i = maxsim_topk(q[:, :budget[0]], self.prefix(budget[1], precision), min(k_all, self.N),
                               backend=backend, exact=exact)
        else:
            _, cand = maxsim_topk(q[:, :first[0]], self.prefix(first[1], precision), min(max(depth, k_all), self.N),
                                  backend=backend, exact=exact)
            view, out_s, out_i = self.rescore_view(budget[1]), [], []
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
        rescored = (None if isinstance(view, on_disk.Prefix) else self.precision) if first else precision
        self.check_plausible(q[:, :budget[0]], keep, budget[1], rescored)
        return (torch.tensor([[x for x, _ in r] for r in keep]), torch.tensor([[j for _, j in r] for r in keep],
                                                                              dtype=torch.long))

    def check_plausible(self, q, keep, r_c, precision):
        """Every search's results, checked at little cost: their stored vectors (the rows returned,
        at the precision that scored them) are what unit vectors can be, and no score is above what
        the query's vectors can reach against unit vectors; else one line naming the file."""
        bad = on_disk.implausible(self.vectors, [j for r in keep for _, j in r], r_c, precision)
        if bad:
            j, file, what = bad
            raise ValueError(f"index {self.path}: item {j} ({self.items[j]['id']}) holds {what} in {file}: the "
                             f"file is damaged; run `search.py verify {self.path}`, then rebuild the index")
        most = q.float().norm(dim=-1).sum(1) * on_disk.norm_bound(self.D, precision or self.meta["dtype"])   # (N_q,)
        for a, r in enumerate(keep):
            for x, j in r:
                if abs(x) > 1.01 * float(most[a]) + 1e-3:     # |sum_i max_j <q_i, c_j>| <= sum_i ||q_i|| max_j ||c_j||
                    view = self.vectors.prefix(r_c, precision)
                    files = ", ".join(os.path.basename(f) for part in view.parts for f in part[2:])
                    raise ValueError(f"index {self.path}: item {j} ({self.items[j]['id']}) scores {x:.6g}, more than "
                                     f"{q.shape[1]} unit query vectors can reach ({float(most[a]):.4g}), from {files}: "
                                     f"run `search.py verify {self.path}`, then rebuild the index")


ITEM_FIELDS = {"n": (int, "a whole number"), "id": ((str, int), "a string or a whole number"), "source": (str, "a string"),
               "kind": (str, "a string"), "file": (str, "a string"), "page": (int, "a whole number"),
               "skipped": (bool, "true or false")}
NEEDED = ("id", "source")                          # what every item has; the others where they apply


def read_items(path, raw):
    """items.jsonl's bytes -> its items: each line a JSON object whose fields have their types
    (ITEM_FIELDS); else one line naming the file, the line and the field."""
    items, lines = [], raw.split(b"\n")
    for n, line in enumerate(lines[:-1] if lines[-1] == b"" else lines, 1):     # after the last newline: nothing
        try:
            it = json.loads(line)
        except ValueError as e:
            raise ValueError(f"index {path}: items.jsonl line {n} is not JSON ({e}): rebuild the index") from None
        if not isinstance(it, dict):
            raise ValueError(f"index {path}: items.jsonl line {n} is {line[:60].decode(errors='replace')}, not an "
                             f"object with id and source: rebuild the index")
        for k, (kind, said) in ITEM_FIELDS.items():
            v = it.get(k)
            if (k in it or k in NEEDED) and (not isinstance(v, kind) or isinstance(v, bool) != (kind is bool)):
                raise ValueError(f"index {path}: items.jsonl line {n}: {k} {json.dumps(v)[:60]} is not {said}: "
                                 f"rebuild the index")
        items.append(it)
    return items


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


def build_index(model, items, out, batch_size=32, progress=True, precision=None, keep_float="all"):
    """Encode items into the index folder `out`, resumably (shards marked done in progress.json, which
    names the items by a digest: its size, rewritten after every shard, does not grow with N);
    memory: one shard of vectors (written into the group files as encoded) and the items' listing;
    precision (any spelling of machinery/precision.py's): None, the float copy alone in the default
    dtype for D; float32 / bfloat16 / float16, the float copy in it; int8 / binary, those groups too,
    beside the float copy (machinery/index.py); keep_float (int8 / binary only): all, none, or an
    r_c: how much of the float copy is kept (machinery/index.py's keep_float).
    The index records the checkpoint's fingerprint (its contents): a rerun with another model is
    refused, and so is a query once the checkpoint has changed."""
    N, R_c, D = len(items), model.config.num_candidate_tokens, model.dim
    precision = Precision.parse(precision, "--precision") if precision is not None else default_float(D)
    groups = budget_groups(model.config.groups, model.config.num_query_tokens, R_c)   # what a budget can name
    float_r_c = on_disk.keep_float(keep_float, R_c, groups, precision)
    os.makedirs(out, exist_ok=True)
    listing = [{"n": n, "id": i, "source": s if isinstance(s, str) else str(s), **item_kind(im)}
               for n, (i, _, im, s) in enumerate(items)]
    state_file = os.path.join(out, "progress.json")
    state = json.load(open(state_file)) if os.path.isfile(state_file) else None
    if state and state.get("fingerprint") != model.fingerprint:
        raise ValueError(f"{out} holds an unfinished index encoded by checkpoint {state.get('checkpoint')} "
                         f"(fingerprint {state.get('fingerprint')}), not by {model.source} ({model.fingerprint}): "
                         f"resume with that checkpoint, or remove {out} to index afresh")
    items_sha256 = hashlib.sha256(json.dumps(listing).encode()).hexdigest()   # the state names its items by digest:
    if state and "items" in state:                                               # rewritten each shard, it stays small
        state["items_sha256"] = hashlib.sha256(json.dumps(state.pop("items")).encode()).hexdigest()   # (an older state)
    if state and (state["items_sha256"] != items_sha256 or state["dim"] != D):
        raise ValueError(f"{out} holds an unfinished index of other items: remove it, or index into another --out")
    if state and on_disk.of_index(state["vectors"]) != precision:
        raise ValueError(f"{out} holds an unfinished index in precision {on_disk.of_index(state['vectors'])}: "
                         f"resume it with that --precision, or remove {out}")
    if state and state["vectors"].get("float_r_c") != float_r_c:
        was = state["vectors"].get("float_r_c")
        raise ValueError(f"{out} holds an unfinished index with --keep-float {'all' if was is None else was or 'none'}: "
                         f"resume it with that --keep-float, or remove {out}")
    if state is None:
        if os.path.isfile(os.path.join(out, "index.json")):
            raise ValueError(f"{out} already holds an index: remove it or choose another --out")
        vectors = on_disk.create(out, N, R_c, D, groups, precision if not precision.quantized else default_float(D),
                                 precision, float_r_c)
        state = {"items_sha256": items_sha256, "dim": D, "model": model.config.backbone, "vectors": vectors.meta,
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
    bad = non_finite_items(index)
    if bad:
        problems.append(bad)
    return problems


def non_finite_items(index):
    """A line naming the items (not skipped) whose stored vectors hold NaN or inf, or None (a full read)."""
    bad = [j for j in on_disk.non_finite_rows(index.vectors) if j not in index.skipped]
    return f"{len(bad)} item(s) hold NaN or inf: " + ", ".join(f"{j} ({index.items[j]['id']})" for j in bad[:10]) \
        if bad else None


# -----------------------------------------------------------------------------
# Qdrant: its engine in-process (qdrant-edge: a shard per collection in a local folder), or a server
# or cluster by URL (qdrant-client). One definition of the collection serves both (qdrant_collection),
# so what the tests check on the engine is what a cluster gets. Every point carries the index's id and
# fingerprint, so a collection is tied to the index that wrote it.

HNSW = dict(m=16, ef_construct=100, full_scan_threshold=1000)   # the first vector's graph (Qdrant's defaults; KB)
OVERSAMPLING = 4.0       # a quantized search scores 4 x its limit in the low bits, then rescores those with the originals


def qdrant_collection(D, budgets, precision=None, dtype="float32", disk=False):
    """The one definition of an index's collection -> {vector name: settings}, for the engine and a
    server alike. 'first': E_c[0], dense, dot product, with an HNSW graph: the 1x1 first stage
    (s_1x1(q, c) = <E_q^1, E_c^1>). 'mv{r_c}' for each stored budget r_c: E_c[:r_c] as a MaxSim
    multivector (s(q, c) = sum_i max_j <E_q^i, E_c^j>), no graph (m = 0: scored exhaustively or as
    a rerank). An int8 / binary index: Qdrant's scalar int8 / binary quantization on every vector
    (binary: the query in 8 bits against the candidates' signs), always searched with rescoring and
    oversampling (qdrant_params). dtype: the index's; a bf16
    index is stored in float16 (bf16's 8 bits fit in its 11; half of float32's bytes). disk:
    the originals on disk, read only to rescore (the engine keeps the quantized ones in RAM)."""
    kind = {"precision": precision if precision in on_disk.QUANTIZED else None,
            "datatype": "float16" if dtype in ("bfloat16", "float16") else "float32", "on_disk": disk}
    return {"first": {"size": D, "multivector": False, "hnsw_m": HNSW["m"], **kind},
            **{f"mv{b}": {"size": D, "multivector": True, "hnsw_m": 0, **kind} for b in budgets}}


def qdrant_params(precision, depth=None):
    """Search settings, stated in full: a quantized collection rescores with the originals after
    oversampling; the HNSW prefetch searches with ef = its depth (at least the graph's ef_construct)."""
    q = {"rescore": True, "oversampling": OVERSAMPLING} if precision in on_disk.QUANTIZED else None
    return {"quantization": q, "hnsw_ef": max(depth, HNSW["ef_construct"]) if depth else None}


class Qdrant:
    """Where an index goes for scale-out: the engine in-process (`where` a folder: one qdrant-edge
    shard per collection, in where/collection) or a server / cluster (`where` an http(s) URL,
    qdrant-client). Both answer the same few calls (exists, owner, count, create, drop, upsert,
    finish, query). A folder is checked at once (a file, unwritable: one line; held by another
    process: when its collection is opened); a server too (unreachable). client: a QdrantClient made
    by the caller (a server's API key, TLS, another timeout), used as the server."""

    def __init__(self, where, client=None):
        self.where, self.server, self.shards = where, client is not None or where.startswith(("http://", "https://")), {}
        self.own_client = client is None
        try:
            if client is not None:
                self.client = client
            elif self.server:
                try:
                    from qdrant_client import QdrantClient
                except ImportError:
                    raise ImportError("--qdrant URL needs qdrant-client: pip install qdrant-client") from None
                self.client = QdrantClient(url=where, timeout=10, check_compatibility=False)
                self.client.get_collections()
            else:
                try:
                    import qdrant_edge  # noqa: F401
                except ImportError:
                    raise ImportError("--qdrant FOLDER needs Qdrant's engine: pip install qdrant-edge-py") from None
                if os.path.exists(where) and not os.path.isdir(where):
                    raise ValueError("it is a file, not a folder")
                os.makedirs(where, exist_ok=True)
                if not os.access(where, os.W_OK | os.X_OK):
                    raise ValueError("the folder is not writable")
        except ImportError:
            raise
        except Exception as e:  # noqa: BLE001 - the clients' many error types all mean "not usable here"
            raise ValueError(f"--qdrant {where}: cannot use it ({type(e).__name__}: {str(e)[:200]})") from None

    # -- the engine's shards
    def shard(self, collection):
        """The open engine shard of a collection (loaded once; None if there is none)."""
        if collection not in self.shards:
            import qdrant_edge as qe
            path = os.path.join(self.where, collection)
            if not os.path.isfile(os.path.join(path, "edge_config.json")):
                return None
            try:
                self.shards[collection] = qe.EdgeShard.load(path)
            except Exception as e:  # noqa: BLE001 - a held WAL, a damaged shard
                held = "WouldBlock" in str(e)
                raise ValueError(f"--qdrant {self.where}: cannot open collection {collection!r} "
                                 + ("(held open by another process)" if held else f"({str(e)[:200]})")) from None
        return self.shards[collection]

    def close(self):
        for s in self.shards.values():
            s.close()
        self.shards = {}
        if self.server and self.own_client:           # a client the caller passed in stays the caller's
            self.client.close()

    # -- the calls both answer
    def exists(self, collection):
        return self.client.collection_exists(collection) if self.server else self.shard(collection) is not None

    def owner(self, collection):
        """The index_id the collection's points carry (None if it holds none)."""
        if self.server:
            points, _ = self.client.scroll(collection, limit=1, with_payload=True, with_vectors=False)
        else:
            import qdrant_edge as qe
            points, _ = self.shard(collection).scroll(qe.ScrollRequest(limit=1, with_payload=True, with_vector=False))
        return points[0].payload.get("index_id") if points else None

    def count(self, collection):
        if self.server:
            return self.client.count(collection, exact=True).count
        import qdrant_edge as qe
        return self.shard(collection).count(qe.CountRequest(exact=True))

    def drop(self, collection):
        if self.server:
            self.client.delete_collection(collection)
        else:
            self.shard(collection)                                   # opened (and so not held elsewhere)
            self.shards.pop(collection).close()
            shutil.rmtree(os.path.join(self.where, collection))

    def create(self, collection, spec):
        """A collection of qdrant_collection's spec."""
        if self.server:
            from qdrant_client import models
            self.client.create_collection(collection, vectors_config={
                name: models.VectorParams(
                    size=v["size"], distance=models.Distance.DOT, on_disk=v["on_disk"],
                    datatype=models.Datatype.FLOAT16 if v["datatype"] == "float16" else models.Datatype.FLOAT32,
                    hnsw_config=models.HnswConfigDiff(**{**HNSW, "m": v["hnsw_m"]}),
                    multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)
                    if v["multivector"] else None,
                    quantization_config=None if v["precision"] is None else
                    models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8,
                                                                                     always_ram=True))
                    if v["precision"] == "int8" else
                    models.BinaryQuantization(binary=models.BinaryQuantizationConfig(
                        always_ram=True, query_encoding=models.BinaryQuantizationQueryEncoding.SCALAR8BITS)))
                for name, v in spec.items()})
            return
        import qdrant_edge as qe
        vectors = {name: qe.EdgeVectorParams(
            size=v["size"], distance=qe.Distance.Dot,
            memory=qe.Memory.Cold if v["on_disk"] else None,
            datatype=qe.VectorStorageDatatype.Float16 if v["datatype"] == "float16" else qe.VectorStorageDatatype.Float32,
            hnsw_config=qe.HnswIndexConfig(**{**HNSW, "m": v["hnsw_m"]}),
            multivector_config=qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim) if v["multivector"] else None,
            quantization_config=None if v["precision"] is None else
            qe.ScalarQuantizationConfig(qe.ScalarType.Int8, always_ram=True) if v["precision"] == "int8" else
            qe.BinaryQuantizationConfig(always_ram=True, query_encoding=qe.BinaryQuantizationQueryEncoding.Scalar8Bits))
            for name, v in spec.items()}
        # indexing_threshold 1 KB: every finished segment gets its graph and quantization at finish()
        config = qe.EdgeConfig(vectors=vectors, optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1))
        self.shards[collection] = qe.EdgeShard.create(os.path.join(self.where, collection), config)

    def upsert(self, collection, ids, vectors, payloads):
        """ids [n], vectors {name: (n, D) or (n, r_c, D) float32 arrays}, payloads [n dicts]."""
        if self.server:
            from qdrant_client import models
            self.client.upsert(collection, [models.PointStruct(id=i, vector={k: v[n].tolist() for k, v in vectors.items()},
                                                               payload=p)
                                            for n, (i, p) in enumerate(zip(ids, payloads))])
            return
        import qdrant_edge as qe
        self.shard(collection).update(qe.UpdateOperation.upsert_points(
            [qe.Point(i, {k: v[n] for k, v in vectors.items()}, p) for n, (i, p) in enumerate(zip(ids, payloads))]))

    def finish(self, collection):
        """The engine builds its HNSW graph and quantization only when optimized: do it now, and flush
        to disk (a server optimizes by itself)."""
        if not self.server:
            shard = self.shard(collection)
            shard.optimize()
            shard.flush()

    def query(self, collection, q, budget, k, first=None, depth=None, precision=None):
        """q (R_q, D) float32: MaxSim at budget over every point, or (first) over the `depth` best at
        first (1x1: the dense first vector through HNSW; another budget: its multivector, exhaustively),
        in ONE request (a prefetch, then the rerank). -> [(score, point id)], best first."""
        params = qdrant_params(precision)
        pre = qdrant_params(precision, depth) if first is not None else None
        dense = first == (1, 1)
        if self.server:
            from qdrant_client import models

            def search_params(p):
                quant = p["quantization"] and models.QuantizationSearchParams(**p["quantization"])
                return models.SearchParams(hnsw_ef=p["hnsw_ef"], quantization=quant)
            prefetch = None if first is None else models.Prefetch(
                query=q[0].tolist() if dense else q[:first[0]].tolist(), using="first" if dense else f"mv{first[1]}",
                limit=depth, params=search_params(pre))
            r = self.client.query_points(collection, prefetch=prefetch, query=q[:budget[0]].tolist(),
                                         using=f"mv{budget[1]}", limit=k, with_payload=False,
                                         search_params=search_params(params))
            return [(p.score, p.id) for p in r.points]
        import qdrant_edge as qe

        def search_params(p):
            quant = p["quantization"] and qe.QuantizationSearchParams(**p["quantization"])
            return qe.SearchParams(hnsw_ef=p["hnsw_ef"], quantization=quant)
        prefetch = None if first is None else [qe.Prefetch(
            limit=depth, query=qe.Query.Nearest(q[0] if dense else q[:first[0]], using="first" if dense else f"mv{first[1]}"),
            params=search_params(pre))]
        r = self.shard(collection).query(qe.QueryRequest(
            limit=k, query=qe.Query.Nearest(q[:budget[0]], using=f"mv{budget[1]}"), prefetches=prefetch,
            params=search_params(params), with_payload=False))
        return [(p.score, p.id) for p in r]


def qdrant_client(where, collection=None, index=None, overwrite=False):
    """A Qdrant for a local folder (the engine) or a server's URL, checked at once (unreachable,
    unwritable, held by another process: one line, before any encoding). With an index: its
    collection may be written (empty, or this index's own; another index's only with overwrite)."""
    store = Qdrant(where)
    try:
        owner = store.owner(collection) if collection is not None and index is not None and not overwrite \
            and store.exists(collection) else None
    except BaseException:
        store.close()
        raise
    if owner and owner != index["index_id"]:
        store.close()
        raise ValueError(f"Qdrant collection {collection!r} at {where} holds another index ({owner}): pass "
                             f"--overwrite to replace it, or --collection another name")
    return store


def to_qdrant(index, store, collection="metaembed", batch=256, overwrite=False, budgets=None, precision=None):
    """One point per candidate: 'first' (E_c[0], for HNSW) and 'mv{r_c}' per stored budget (MaxSim over
    the first r_c vectors), with the index's id, `batch` rows at a time (memory is one batch, whatever
    N), from the float copy, or where the index keeps none (--keep-float) its low bits dequantised.
    budgets: the r_c to send (default every stored one); precision: the collection's quantization
    (default the index's). An existing collection of this index is completed (upserts are
    idempotent), another's replaced only with overwrite. The engine then builds its graph and
    quantization (Qdrant.finish)."""
    budgets = budgets or [b for _, b in index.bounds]
    if store.exists(collection):
        owner = store.owner(collection)
        if owner not in (None, index.meta["index_id"]) and not overwrite:
            raise ValueError(f"Qdrant collection {collection!r} holds another index ({owner}): pass --overwrite")
        if owner != index.meta["index_id"]:
            store.drop(collection)
    if not store.exists(collection):
        store.create(collection, qdrant_collection(index.D, budgets, precision or index.precision, index.meta["dtype"]))
    view = index.rescore_view(max(budgets))                              # (N, r_c, D): float, or low bits
    tag = {"index_id": index.meta["index_id"], "fingerprint": index.meta["fingerprint"]}
    for s in range(0, index.N, batch):
        keep = [n for n in range(min(batch, index.N - s)) if s + n not in index.skipped]
        if not keep:                               # a batch that was skipped whole has nothing to send
            continue
        E = view[s:s + batch]
        E = (E.dequantize() if isinstance(E, on_disk.Quantized) else E.float()).numpy()[keep]    # (n, r_c, D)
        store.upsert(collection, [s + n for n in keep], {"first": E[:, 0], **{f"mv{b}": E[:, :b] for b in budgets}},
                     [{**index.items[s + n], **tag} for n in keep])
    store.finish(collection)


def check_collection(store, index, collection):
    """A query through Qdrant: the collection must be this index's, and whole."""
    if not store.exists(collection):
        raise ValueError(f"Qdrant has no collection {collection!r} there: write it with "
                         f"`search.py push --index {index.path} --qdrant ...`")
    owner = store.owner(collection)
    if owner is None and index.N > len(index.skipped):
        raise ValueError(f"Qdrant collection {collection!r} is empty (an upload that failed): write it with "
                         f"`search.py push --index {index.path} --qdrant ...`")
    if owner != index.meta.get("index_id"):
        raise ValueError(f"Qdrant collection {collection!r} holds another index ({owner}), not {index.path}")
    have, want = store.count(collection), index.N - len(index.skipped)
    if have != want:
        raise ValueError(f"Qdrant collection {collection!r} holds {have} of the index's {want} points (an upload "
                         f"cut short): complete it with `search.py push --index {index.path} --qdrant ...`")


def qdrant_search(store, q, budget, k, first=None, depth=None, collection="metaembed", precision=None):
    """q (R_q, D): MaxSim at budget over all points, or over the `depth` best at `first`, as one
    request (Qdrant.query). precision: the index's (int8 / binary: the collection is quantized and
    searched with rescoring and oversampling). -> [(score, point id)]."""
    if not store.exists(collection):
        raise ValueError(f"Qdrant has no collection {collection!r} there: write it with `search.py index ... --qdrant`")
    return store.query(collection, np.ascontiguousarray(q, dtype=np.float32), budget, k, first,
                       depth if first is not None else None, precision)
