"""Data sets through Hugging Face `datasets`, from a hub id or a local folder laid out like the
hub repository: the training layouts (MMEB-train, MoCa, ViDoRe's training set), the official
mixture, MMEB-eval and ViDoRe (v1 QA and BEIR layouts), with the checks that name a bad file,
subset, split, column or row before any work starts."""
import hashlib
import math
import os

import torch

from machinery.backbones import looks_like_hub_id

# -----------------------------------------------------------------------------
# Hugging Face datasets: hub ids or local folders laid out like the hub repositories

def _configs(path, what):
    """The configs of a data set: a local folder laid out like the hub repo, or a hub id. A path
    that can only be a folder (absolute, ./, ~, or more than one '/') and does not exist is said to
    be missing at once, not looked up on the hub."""
    import datasets
    if not os.path.exists(os.path.expanduser(path)) and not looks_like_hub_id(path):
        raise FileNotFoundError(f"{what}: the folder {path!r} does not exist (a hub id looks like 'owner/name')")
    try:
        return datasets.get_dataset_config_names(os.path.expanduser(path))
    except Exception as e:  # noqa: BLE001 - anything here means the data set cannot be reached
        raise FileNotFoundError(f"{what}: cannot open {path!r} ({type(e).__name__}: {e}). Give a hub "
                                f"id you can reach or a local folder laid out like the hub repo") from None


def _local_cache(path):
    """A cache folder for a local copy, keyed by its absolute path and its files' sizes and times.
    datasets keys a local folder's cache by the folder's name alone, so two copies both called
    'MMEB-train' (or one edited in place) would silently read each other's cached tables."""
    import datasets
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        return None                                   # a hub id: datasets' own cache is right
    h = hashlib.sha1(path.encode())
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            st = os.stat(os.path.join(root, f))
            h.update(f"{os.path.relpath(os.path.join(root, f), path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "metaembed-local", h.hexdigest()[:16])


def _load(path, name, split, what):
    """load_dataset with errors that name the data set, subset and split."""
    import datasets
    configs = _configs(path, what)
    if name is not None and name not in configs:
        raise ValueError(f"{what}: no subset {name!r} in {path!r}; it has: {', '.join(configs)}")
    try:
        return datasets.load_dataset(os.path.expanduser(path), name, split=split, cache_dir=_local_cache(path))
    except ValueError as e:
        raise ValueError(f"{what}: cannot load split {split!r} of {path!r}"
                         f"{f' subset {name!r}' if name else ''}: {e}") from None


def _require(ds, columns, what):
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; it has {ds.column_names}")


def _image_path(images_dir, path, what):
    if not path:
        return None
    if images_dir is None:
        raise ValueError(f"{what} refers to image {path!r}: give the folder the images are in "
                         f"(--images / --mmeb-images)")
    return os.path.join(images_dir, path)


# Training layouts, by their columns (images are in the rows, or paths relative to an images folder):
LAYOUTS = {
    "mmeb": ("qry", "qry_image_path", "pos_text", "pos_image_path"),   # MMEB-train [+ neg_text, neg_image_path]
    "moca": ("qry", "qry_image", "pos_text", "pos_image"),             # + neg_text (list), neg_image_0..K-1
    "colpali": ("query", "image"),                                     # ViDoRe's training set: the page is the positive
}


def detect_layout(columns, what):
    for name, needed in LAYOUTS.items():
        if all(c in columns for c in needed):
            return name
    raise ValueError(f"{what}: columns {sorted(columns)} match no training layout; one of: "
                     + "; ".join(f"{k}: {', '.join(v)}" for k, v in LAYOUTS.items()))


def _image_columns(ds, layout):
    if layout == "mmeb":
        return [c for c in ("qry_image_path", "pos_image_path", "neg_image_path") if c in ds.column_names]
    if layout == "moca":
        return [c for c in ds.column_names if c in ("qry_image", "pos_image") or c.startswith("neg_image_")]
    return ["image"]


class Source(torch.utils.data.Dataset):
    """One training source: rows of a `datasets.Dataset` in one of LAYOUTS, read (and decoded)
    lazily, one example at a time. rows: which rows of ds are used (a cap, a held-out split)."""

    def __init__(self, ds, layout, name, images_dir=None, rows=None):
        self.ds, self.layout, self.name, self.images_dir = ds, layout, name, images_dir
        self.rows = range(len(ds)) if rows is None else rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        n = self.rows[int(i)]
        r, src = self.ds[n], f"{self.name} row {n}"
        img = lambda x: _image_path(self.images_dir, x, src) if isinstance(x, str) else x  # noqa: E731
        if self.layout == "colpali":
            return dict(qry_text=r["query"], qry_image=None, pos_text="", pos_image=r["image"], negs=[], source=src)
        if self.layout == "mmeb":
            negs = [(r.get("neg_text") or "", img(r.get("neg_image_path")))]
        else:  # moca: neg_text a list, images in neg_image_0, neg_image_1, ...
            texts = list(r.get("neg_text") or [])
            K = max([len(texts)] + [int(c.rsplit("_", 1)[1]) + 1 for c in r if c.startswith("neg_image_")
                                    and r[c] not in (None, "")])
            negs = [(texts[k] if k < len(texts) else "", img(r.get(f"neg_image_{k}"))) for k in range(K)]
        negs = [(t, im) for t, im in negs if t or im is not None]
        return dict(qry_text=r["qry"], qry_image=img(r[LAYOUTS[self.layout][1]]), pos_text=r["pos_text"],
                    pos_image=img(r[LAYOUTS[self.layout][3]]), negs=negs, source=src)


def load_source(path, subset, split, name, images_dir=None):
    """A hub id or local folder (one subset, one split) -> Source; images checked up front."""
    ds = _load(path, subset, split, name)
    layout = detect_layout(ds.column_names, name)
    check_image_paths(ds, _image_columns(ds, layout), images_dir, name)
    return Source(ds, layout, name, images_dir)


def load_mmeb_train(path="TIGER-Lab/MMEB-train", subsets=None, images_dir=None, max_per_subset=None):
    """MMEB-train subsets (split 'original'), each capped at its first max_per_subset rows.

    Columns qry, qry_image_path, pos_text, pos_image_path [, neg_text, neg_image_path]."""
    if not subsets:
        raise ValueError("MMEB-train: name the subsets to train on (e.g. --subsets ImageNet_1K CIRR)")
    parts = []
    for name in subsets:
        what = f"MMEB-train/{name}"
        ds = _load(path, name, "original", what)
        _require(ds, LAYOUTS["mmeb"], what)
        check_image_paths(ds, _image_columns(ds, "mmeb"), images_dir, what)
        rows = range(min(max_per_subset or len(ds), len(ds)))
        parts.append(Source(ds, "mmeb", what, images_dir, rows))
    return torch.utils.data.ConcatDataset(parts)


def check_image_paths(ds, columns, images_dir, what):
    """Every image path of a training set exists, checked before training (not hours in, at the
    batch that reaches it); the missing ones are counted and the first named with their rows.
    Columns holding images themselves (not paths) need no check."""
    missing, total = [], 0
    for col in columns:
        if getattr(ds.features.get(col), "dtype", None) != "string":
            continue
        for i, p in enumerate(ds[col]):
            if not p:
                continue
            total += 1
            if images_dir is None:
                raise ValueError(f"{what} row {i} refers to image {p!r}: give the folder the images are in (--images)")
            if not os.path.isfile(os.path.join(images_dir, p)):
                missing.append(f"row {i} {col} {os.path.join(images_dir, p)!r}")
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} of {total} images are missing, e.g. "
                                + "; ".join(missing[:3]) + " (is --images the folder the images were unpacked into?)")


def load_colpali_train(path="vidore/colpali_train_set", max_rows=None):
    """ViDoRe training set: columns query, image (the positive page)."""
    ds = _load(path, None, "train", "colpali-train")
    _require(ds, LAYOUTS["colpali"], "colpali-train")
    return Source(ds, "colpali", "colpali-train", rows=range(min(max_rows or len(ds), len(ds))))


# -----------------------------------------------------------------------------
# the official mixture: sources with weights and caps, sampled in runs of one source

MMEB_TRAIN = "TIGER-Lab/MMEB-train"
MMEB_TRAIN_SUBSETS = ["ImageNet_1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "OK-VQA", "A-OKVQA",
                      "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "VisDial", "CIRR", "VisualNews_t2i",
                      "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA", "MSCOCO"]


class Mixture(torch.utils.data.Dataset):
    """Training sources, each with a weight and a row cap; an example is addressed (source, row).

    The order (official "interleaved" sampling): pick a source with probability proportional to its
    weight among those not yet exhausted, take its next `run` examples (its rows in a seeded
    order), repeat until every source is exhausted; then the next epoch. Each rank has its own
    order (seed, rank, epoch), a pure function of them, so a resumed run sees the same batches."""

    def __init__(self, names, sources, weights, heldout):
        self.names, self.sources, self.weights, self.heldout = names, sources, weights, heldout

    def __len__(self):
        return sum(len(s) for s in self.sources)

    def __getitem__(self, key):
        s, i = key
        return self.sources[s][i]

    def epoch(self, seed, rank, epoch, run):
        """-> (source of each example, row within the source), numpy arrays of len(self)."""
        import numpy as np
        rng = np.random.default_rng([seed, rank, epoch])
        left = [list(rng.permutation(len(s))) for s in self.sources]
        pos = [0] * len(left)
        w = np.array(self.weights, dtype=float)
        src, rows = [], []
        while True:
            alive = [k for k in range(len(left)) if pos[k] < len(left[k])]
            if not alive:
                break
            p = w[alive] / w[alive].sum()
            k = alive[rng.choice(len(alive), p=p)]
            take = left[k][pos[k]:pos[k] + run]
            pos[k] += len(take)
            src += [k] * len(take)
            rows += take
        return np.array(src, dtype=np.int64), np.array(rows, dtype=np.int64)


def read_mixture(file):
    """The mixture file's entries, checked: one line for a malformed entry, a duplicated source, a
    weight that is not a finite positive number, a cap that is not a whole number."""
    import yaml

    class Loader(yaml.SafeLoader):                   # a duplicated source name is an error, not "the last wins"
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
            dup = sorted({str(k) for k in keys if keys.count(k) > 1})
            if dup:
                raise yaml.constructor.ConstructorError(None, None, f"{', '.join(dup)} appear(s) twice", node.start_mark)
            return super().construct_mapping(node, deep)
    try:
        with open(file) as f:
            spec = yaml.load(f, Loader=Loader)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"mixture {file}: cannot read it ({str(e).strip()})") from None
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"mixture {file}: expected 'Source: {{weight: W, num_samples: N}}' entries")
    for name, entry in spec.items():
        where = f"mixture {file}: source {name}"
        if entry is not None and not isinstance(entry, dict):
            raise ValueError(f"{where}: expected {{weight: W, num_samples: N, path: ...}}, got {entry!r}")
        entry = spec[name] = dict(entry or {})
        unknown = set(entry) - {"weight", "num_samples", "path", "subset", "split", "images"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
        w = entry.setdefault("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (0 < w < float("inf")):
            raise ValueError(f"{where}: weight must be a finite number > 0, got {w!r}")
        cap = entry.get("num_samples")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"{where}: num_samples must be a whole number >= 1, got {cap!r}")
        for key in ("path", "subset", "split", "images"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise ValueError(f"{where}: {key} must be a string, got {entry[key]!r}")
    if not math.isfinite(sum(e["weight"] for e in spec.values())):
        raise ValueError(f"mixture {file}: the weights add up to more than a float holds: scale them down")
    return spec


def load_mixture(file, images_dir=None, holdout=100, seed=0, mmeb_train=MMEB_TRAIN):
    """A mixture file (YAML, the official form), one entry per source:

        ImageNet_1K: {weight: 1.0, num_samples: 100000}       # an MMEB-train subset
        ArxivQA: {weight: 1.0, num_samples: 50000, path: DIR_OR_HUB_ID, split: train}
        tevatron_colpali: {weight: 5.0, path: ...}           # num_samples absent: every row

    path defaults to mmeb_train (train.py's --mmeb-train) for its 20 subsets (subset = the name,
    split 'original'); elsewhere path is needed, subset optional, split 'train' by default; images
    (a folder for path columns) defaults to --images. The last `holdout` rows of each source are
    held out (for --eval-every); num_samples caps the rest by a seeded choice (a cap above the
    rows is noted in mixture.notes). -> Mixture."""
    import numpy as np
    spec = read_mixture(file)
    names, sources, weights, heldout, notes = [], [], [], [], []
    no_path = [n for n, s in spec.items() if not s.get("path") and n not in MMEB_TRAIN_SUBSETS]
    if no_path:
        raise ValueError(f"mixture {file}: no path for {', '.join(no_path)} (only the MMEB-train subsets have a "
                         f"default): set `path:` to a hub id or a local folder in one of the layouts "
                         f"({', '.join(LAYOUTS)}), or remove the source")
    for name, s in spec.items():
        cap, mmeb = s.get("num_samples"), not s.get("path")
        src = load_source(s.get("path") or mmeb_train, s.get("subset", name if mmeb else None),
                          s.get("split", "original" if mmeb else "train"), name, s.get("images", images_dir))
        n = len(src)
        if n <= holdout:
            raise ValueError(f"mixture {file}: source {name} has {n} rows, not more than the {holdout} held out")
        train_rows = np.arange(n - holdout)
        if cap is not None and cap < len(train_rows):
            train_rows = np.sort(np.random.default_rng([seed, len(names)]).choice(train_rows, cap, replace=False))
        elif cap is not None:
            notes.append(f"mixture source {name}: num_samples {cap} is more than its {len(train_rows)} training rows "
                         f"(after {holdout} held out): all of them are used")
        names.append(name)
        weights.append(float(s["weight"]))
        sources.append(Source(src.ds, src.layout, name, src.images_dir, train_rows.tolist()))
        heldout.append(Source(src.ds, src.layout, name, src.images_dir, list(range(n - holdout, n))))
    mixture = Mixture(names, sources, weights, heldout)
    mixture.notes = notes
    return mixture


def load_mmeb_eval(path, subset, images_dir, max_rows=None):
    """One MMEB-eval subset (split 'test') -> rows dict(qry=(text, image), cands=[(text, image)...]),
    candidate 0 the positive. Image paths are joined to images_dir and checked to exist."""
    what = f"MMEB-eval/{subset}"
    if images_dir is None or not os.path.isdir(images_dir):
        raise FileNotFoundError(f"{what}: image folder {images_dir!r} does not exist (--mmeb-images: "
                                f"the folder MMEB's images were unpacked into)")
    ds = _load(path, subset, "test", what)
    _require(ds, ["qry_text", "qry_img_path", "tgt_text", "tgt_img_path"], what)
    if max_rows:
        ds = ds.select(range(min(max_rows, len(ds))))
    rows = []
    for i, r in enumerate(ds):
        where = f"{what} row {i}"
        if not r["tgt_text"]:
            raise ValueError(f"{where}: no candidates (tgt_text is empty): the row cannot be scored")
        if len(r["tgt_text"]) != len(r["tgt_img_path"]):
            raise ValueError(f"{where}: tgt_text has {len(r['tgt_text'])} entries, tgt_img_path "
                             f"{len(r['tgt_img_path'])}")
        paths = [_image_path(images_dir, p, where) for p in [r["qry_img_path"]] + r["tgt_img_path"]]
        for p in paths:
            if p is not None and not os.path.isfile(p):
                raise FileNotFoundError(f"{where}: image {p!r} does not exist")
        rows.append(dict(qry=(r["qry_text"], paths[0]), cands=list(zip(r["tgt_text"], paths[1:]))))
    return rows


class LazyImage:
    """Row i's image of a datasets.Dataset, decoded only when called: a corpus of 100k pages is
    never held decoded, each page is decoded in the batch (or DataLoader worker) that encodes it."""

    def __init__(self, ds, i, column="image"):
        self.ds, self.i, self.column = ds, i, column

    def __call__(self):
        return self.ds.select_columns([self.column])[self.i][self.column]


def unique_names(paths):
    """A result key per data set: its folder's name, or as many trailing path parts as make it
    unique (a/docvqa and b/docvqa are two sets, not one column)."""
    parts = [os.path.normpath(p).split(os.sep) for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise ValueError(f"--vidore names the same data set twice: {paths}")


def load_vidore(path, max_queries=None):
    """A ViDoRe data set -> retrieval task. BEIR layout (configs corpus / queries / qrels) or the
    v1 QA layout (split 'test': query, image, image_filename; queries de-duplicated, None dropped,
    a query on several rows relevant to the last row's page, as the official evaluator).
    Page images are LazyImage: decoded when encoded, not here. Rows sharing an image_filename are
    scored each and merged by max (the task's same_doc maps a row's corpus id to its filename)."""
    configs = _configs(path, "ViDoRe")
    name = os.path.basename(os.path.normpath(path))
    if {"corpus", "queries", "qrels"} <= set(configs):
        corpus_ds = _load(path, "corpus", "test", f"ViDoRe {name} corpus")
        queries_ds = _load(path, "queries", "test", f"ViDoRe {name} queries")
        qrels_ds = _load(path, "qrels", "test", f"ViDoRe {name} qrels")
        _require(corpus_ds, ["corpus-id", "image"], f"ViDoRe {name} corpus")
        _require(queries_ds, ["query-id", "query"], f"ViDoRe {name} queries")
        _require(qrels_ds, ["query-id", "corpus-id", "score"], f"ViDoRe {name} qrels")
        corpus = {str(r["corpus-id"]): ("", LazyImage(corpus_ds, i))
                  for i, r in enumerate(corpus_ds.select_columns(["corpus-id"]))}
        queries = {str(r["query-id"]): (r["query"], None) for r in queries_ds}
        qrels = {}
        for r in qrels_ds:
            if r["score"] > 0:
                qrels.setdefault(str(r["query-id"]), {})[str(r["corpus-id"])] = int(r["score"])
        queries = {q: v for q, v in queries.items() if q in qrels}
    else:
        ds = _load(path, None, "test", f"ViDoRe {name}")
        _require(ds, ["query", "image", "image_filename"], f"ViDoRe {name}")
        corpus, queries, qrels, same_doc = {}, {}, {}, {}
        for i, r in enumerate(ds.select_columns(["query", "image_filename"])):
            page = r["image_filename"]            # rows sharing a filename: each page scored, merged by max
            key = page if page not in corpus else f"{page}#row{i}"
            corpus[key], same_doc[key] = ("", LazyImage(ds, i)), page
            if r["query"] is None:
                continue
            queries.setdefault(r["query"], (r["query"], None))
            # the official evaluator (vidore-benchmark's ViDoReEvaluatorQA, which the MetaEmbed code
            # vendors) builds qrels as a dict over the rows: a query on several rows keeps the LAST one's page
            qrels[r["query"]] = {r["image_filename"]: 1}
    if max_queries:
        keep = list(queries)[:max_queries]
        queries, qrels = {q: queries[q] for q in keep}, {q: qrels[q] for q in keep}
    task = dict(queries=queries, corpus=corpus, qrels=qrels)
    if not {"corpus", "queries", "qrels"} <= set(configs) and any(k != v for k, v in same_doc.items()):
        task["same_doc"] = same_doc                   # corpus id -> the document it scores for
    return task


