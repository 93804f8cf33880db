"""Data sets through Hugging Face `datasets`, from a hub id or a local folder laid out like the
hub repository: the training layouts (MMEB-train, MoCa, ViDoRe's training set), the official
mixture, MMEB-eval and ViDoRe (v1 QA and BEIR layouts), with the checks that name a bad file,
subset, split, column or row before any work starts."""
import hashlib
import math
import os
import re

import torch

from machinery.backbones import load_image, looks_like_hub_id

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
    # MoCa's training data as the official loader reads it (MoCa_train_with_image): images in the rows,
    # each column present only where the subset has that image; neg_text a list; *_path columns ignored
    "moca": ("qry", "pos_text"),                                       # + qry_image, pos_image, neg_text, neg_image_k
    "mmeb": ("qry", "qry_image_path", "pos_text", "pos_image_path"),   # MMEB-train [+ neg_text, neg_image_path]
    "colpali": ("query", "image"),                                     # ViDoRe's training set: the page is the positive
}
MOCA_IMAGES = ("qry_image", "pos_image", "neg_image_0")               # a MoCa copy has at least one of these


def detect_layout(columns, what):
    for name, needed in LAYOUTS.items():
        if all(c in columns for c in needed) and (name != "moca" or any(c in columns for c in MOCA_IMAGES)):
            return name
    need = {k: ", ".join(v) + (f" and one of {', '.join(MOCA_IMAGES)}" if k == "moca" else "")
            for k, v in LAYOUTS.items()}
    raise ValueError(f"{what}: columns {sorted(columns)} match no training layout; one of: "
                     + "; ".join(f"{k}: {v}" for k, v in need.items()))


def _image_columns(ds, layout):
    if layout == "mmeb":
        return [c for c in ("qry_image_path", "pos_image_path", "neg_image_path") if c in ds.column_names]
    if layout == "moca":
        return [c for c in ds.column_names if c in ("qry_image", "pos_image") or _neg_image(c)]
    return ["image"]


def _neg_image(column):
    """MoCa's neg_image_0, neg_image_1, ... (not neg_image_path)."""
    return column.startswith("neg_image_") and column[len("neg_image_"):].isdigit()


def _negative_columns(ds, layout):
    if layout == "mmeb":
        return [c for c in ("neg_text", "neg_image_path") if c in ds.column_names]
    return [c for c in ds.column_names if c == "neg_text" or _neg_image(c)] if layout == "moca" else []


class Source(torch.utils.data.Dataset):
    """One training source: rows of a `datasets.Dataset` in one of LAYOUTS, read (and decoded)
    lazily, one example at a time. rows: which rows of ds are used (a cap, a held-out split). A row
    whose images cannot be decoded is one ValueError naming the source and the row; skip_bad: it is
    skipped instead, the next good row of the source taken in its place (the same one every time, so
    a resumed run sees the same examples) and named in the example's "skipped"."""

    def __init__(self, ds, layout, name, images_dir=None, rows=None, skip_bad=False):
        self.ds, self.layout, self.name, self.images_dir = ds, layout, name, images_dir
        self.rows = range(len(ds)) if rows is None else rows
        self.skip_bad = skip_bad

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        if not self.skip_bad:
            return self.example(self.rows[int(i)])
        skipped = []
        for k in range(len(self.rows)):
            try:
                e = self.example(self.rows[(int(i) + k) % len(self.rows)], decode=True)
            except ValueError as err:
                skipped.append(str(err))
                continue
            return {**e, "skipped": skipped}
        raise ValueError(f"{self.name}: no row of its {len(self.rows)} can be read (first: {skipped[0]})")

    def example(self, n, decode=False):
        """Row n as an example; decode: every image decoded now (a path too), so a bad one is found here."""
        src = f"{self.name} row {n}"
        from PIL import Image
        try:
            r = self.ds[n]
            for v in r.values():                      # images in the row: decoded now, not deep in a batch
                if isinstance(v, Image.Image):
                    v.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            why = "not an image PIL can identify" if isinstance(e, Image.UnidentifiedImageError) else \
                f"{type(e).__name__}: {str(e)[:120]}"
            raise ValueError(f"{src}: an image in the row cannot be decoded ({why}): repair or drop the row, or "
                             f"pass --skip-bad-rows to skip such rows") from None

        def img(x):                                   # a path joined to --images; decode: read and decoded now
            x = _image_path(self.images_dir, x, src) if isinstance(x, str) else x
            if not decode or x is None:
                return x
            try:
                return load_image(x, f" ({src})")
            except (FileNotFoundError, ValueError) as e:
                raise ValueError(str(e)) from None
        if self.layout == "colpali":
            return dict(qry_text=r["query"], qry_image=None, pos_text="", pos_image=img(r["image"]), negs=[], source=src)
        if self.layout == "mmeb":
            negs = [(r.get("neg_text") or "", img(r.get("neg_image_path")))]
            negs = [(t, im) for t, im in negs if t or im is not None]
            return dict(qry_text=r["qry"], qry_image=img(r["qry_image_path"]), pos_text=r["pos_text"],
                        pos_image=img(r["pos_image_path"]), negs=negs, source=src)
        # moca, as the official collator reads it: "<|image_1|>\n" dropped from every text, an absent image
        # column is no image; negative k = (neg_text[k], neg_image_k), a short neg_text list repeats its last
        strip = lambda t: (t or "").replace("<|image_1|>\n", "")  # noqa: E731
        texts = r.get("neg_text") or []
        texts = [strip(t) for t in ([texts] if isinstance(texts, str) else texts)]
        K = max([len(texts)] + [int(c.rsplit("_", 1)[1]) + 1 for c in r if _neg_image(c) and r[c] not in (None, "")])
        negs = [(texts[min(k, len(texts) - 1)] if texts else "", img(r.get(f"neg_image_{k}"))) for k in range(K)]
        negs = [(t, im) for t, im in negs if t or im is not None]
        return dict(qry_text=strip(r["qry"]), qry_image=img(r.get("qry_image")), pos_text=strip(r["pos_text"]),
                    pos_image=img(r.get("pos_image")), negs=negs, source=src)


def negatives_in(source):
    """-> how many of a Source's rows carry at least one hard negative, read from the columns (no image
    is decoded). A source whose copy has none trains with in-batch negatives only."""
    import pyarrow.compute as pc
    cols = _negative_columns(source.ds, source.layout)
    if not cols or not len(source):
        return 0
    rows = source.ds.select(source.rows).select_columns(cols).with_format("arrow")[:]
    has = None
    for c in cols:
        col, kind = rows.column(c), str(rows.column(c).type)
        if kind in ("string", "large_string"):         # a text, or an image path: present when not ""
            ok = pc.greater(pc.utf8_length(col), 0)
        elif kind.startswith(("list", "large_list")):  # MoCa's neg_text: a list of texts
            ok = pc.greater(pc.list_value_length(col), 0)
        else:                                          # an image in the row: present when not null
            ok = pc.is_valid(col)
        ok = pc.fill_null(ok, False)
        has = ok if has is None else pc.or_(has, ok)
    return int(pc.sum(has).as_py() or 0)


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
    """Training sources, each with a weight (its sampling probability, once normalised) and its rows;
    an example is addressed (source, row). The order they are drawn in is data.MixtureBatches."""

    def __init__(self, names, sources, weights, heldout):
        self.names, self.sources, self.weights, self.heldout = names, sources, weights, heldout

    def __len__(self):
        return sum(len(s) for s in self.sources)

    def __getitem__(self, key):
        s, i = key
        return self.sources[s][i]


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
        if not isinstance(name, str):                # 1 and '1' would be two sources shown alike; ~ is None
            raise ValueError(f"mixture {file}: source name {name!r} is YAML's {type(name).__name__}, not text: "
                             f"quote it ('{name}')" if name is not None else
                             f"mixture {file}: a source is named ~ (YAML's null): give it a name")
        if entry is not None and not isinstance(entry, dict):
            raise ValueError(f"{where}: expected {{weight: W, num_samples: N, path: ...}}, got {entry!r}")
        entry = spec[name] = dict(entry or {})
        unknown = set(entry) - {"weight", "num_samples", "path", "subset", "split", "images"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
        w = entry.setdefault("weight", 1.0)
        if isinstance(w, str) and re.fullmatch(r"\s*[+]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+\s*", w):
            w = entry["weight"] = float(w)           # 1e-3: text to YAML 1.1 (PyYAML), a number to YAML 1.2
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


def load_mixture(file, images_dir=None, holdout=100, seed=0, mmeb_train=MMEB_TRAIN, skip_bad_rows=False):
    """A mixture file (YAML, the official form), one entry per source:

        ImageNet_1K: {weight: 1.0, num_samples: 100000}       # an MMEB-train subset (path: mmeb_train)
        CIRR: {weight: 1.0, num_samples: 50000, path: DIR_OR_HUB_ID}
        tevatron_colpali: {weight: 5.0, path: ...}           # num_samples absent: every row

    path: a hub id or a folder laid out like the hub repo (a relative folder is read from the current
    directory, as the official DATA_DIR); absent, the 20 MMEB-train subsets read mmeb_train (--mmeb-train).
    subset: the source's name where the data set has a config of that name; split 'original' (the
    official one); images: the folder for image path columns, default images_dir (--images).
    A cap takes the FIRST num_samples rows (the official split f"original[:{num_samples}]") and the last
    `holdout` rows of that prefix are held out (for --eval-every). Every source is opened and its first
    row read before this returns; one ValueError names every source that cannot be. skip_bad_rows: a
    row whose images cannot be decoded is skipped (Source's skip_bad); else it is one line. -> Mixture, with
    .notes (what to tell the user) and .negatives (rows with a hard negative, per source)."""
    spec = read_mixture(file)
    names, sources, weights, heldout, notes, bad = [], [], [], [], [], []
    for name, s in spec.items():
        path, cap = s.get("path") or (mmeb_train if name in MMEB_TRAIN_SUBSETS else None), s.get("num_samples")
        try:
            if path is None:
                raise ValueError(f"{name}: no path (only the MMEB-train subsets have a default): set `path:` to a "
                                 f"hub id or a local folder in one of the layouts ({', '.join(LAYOUTS)})")
            subset = s.get("subset") or (name if name in _configs(path, name) else None)
            src = load_source(path, subset, s.get("split", "original"), name, s.get("images", images_dir))
            n = min(len(src), cap or len(src))                    # the prefix: original[:num_samples]
            if n <= holdout:
                raise ValueError(f"{name}: {n} rows{' (num_samples)' if n == cap else ''}, not more than the "
                                 f"{holdout} held out")
            src.skip_bad = skip_bad_rows
            src[0]                                                # the first row reads (images, columns)
        except (ValueError, FileNotFoundError) as e:
            bad.append((name, str(e)))
            continue
        if cap is not None and cap > len(src):
            notes.append(f"mixture source {name}: num_samples {cap} is more than its {n - holdout} training rows "
                         f"(after {holdout} held out): all of them are used")
        names.append(name)
        weights.append(float(s["weight"]))
        sources.append(Source(src.ds, src.layout, name, src.images_dir, range(n - holdout), skip_bad_rows))
        heldout.append(Source(src.ds, src.layout, name, src.images_dir, range(n - holdout, n), skip_bad_rows))
    if bad:  # one line: sources failing alike are named together
        said = {}
        for name, e in bad:
            said.setdefault(e.split(": ", 1)[1] if e.startswith(f"{name}: ") else e, []).append(name)
        raise ValueError(f"mixture {file}: {len(bad)} of {len(spec)} source(s) cannot be read: "
                         + "; ".join(f"{', '.join(names)}: {e}" for e, names in said.items()))
    mixture = Mixture(names, sources, weights, heldout)
    mixture.notes, mixture.negatives, mixture.spec = notes, [negatives_in(s) for s in sources], spec
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


