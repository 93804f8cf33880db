"""The one on-disk index format, for search.py and evaluate.py --index-dir.

A folder holds the candidate vectors group by group: group-A-B.bin holds vectors A+1..B of every
candidate, (N, B - A, D) in the index dtype, for the group boundaries B of the model's
Matryoshka groups (0-1, 1-4, 4-8, 8-16, 16-64). A prefix r_c (a budget's candidate side) reads
only the groups up to r_c, each in one contiguous run: 1/64 of the bytes at 1x1. index.json records count, dim,
num_candidate_tokens, groups and dtype (and whatever the writer adds; search.py adds the model
and the items). Vectors are written with pwrite and read with plain reads (ranges of rows) or a
memory map (lists of rows), so resident memory stays one chunk, whatever N is.

Precision, the second budget axis (the vocabulary is machinery/precision.py's; index.json's
"precision" is written for int8 / binary only, absent = the float "dtype"; an old "bf16" is read
as that dtype): besides
the float copy, an int8 or binary index stores each group once more in fewer bits, in the same
layout: group-A-B.int8.bin (N, B - A, D) int8 codes, or group-A-B.binary.bin (N, B - A, ceil(D/8))
uint8 sign bits (bit d % 8 of byte d // 8, 1 = positive), and group-A-B.scale.bin (N, B - A)
float32, one scale a vector:

    int8:   x ~ scale * code,   scale = max_d |x_d| / 127,  code = round(x / scale)
    binary: x ~ scale * sign,   scale = mean_d |x_d|  (the least-squares scale of the signs)

Search reads the low-bit groups; the float copy is read only to rescore a cascade's best few.
A low-bit index may keep less of its float copy (search.py index --keep-float): index.json's
"float_r_c" is the r_c up to which group-A-B.bin files exist (0: none, a group end: the groups up to
it; absent: all of them). A cascade rescoring past it rescores from the low bits (Vectors.rescore_view).
"""
import hashlib
import json
import os

import numpy as np
import torch

from machinery.checkpoints import write_atomic
from machinery.precision import FLOATS as DTYPES, QUANTIZED, Precision, default_float, of_index, vector_bytes  # noqa: F401

PRECISIONS = tuple(Precision)         # the command lines' --precision: float32, bfloat16, float16, int8, binary


def quantize(x, precision):
    """x (N, r, D) float -> Quantized (see the module's docstring for the two rules)."""
    x = x.detach().float()
    if precision == "int8":
        scale = x.abs().amax(-1) / 127                                          # (N, r)
        codes = torch.round(x / scale.clamp_min(1e-30)[..., None]).clamp_(-127, 127).to(torch.int8)
    elif precision == "binary":
        scale = x.abs().mean(-1)                                                # (N, r)
        bits = torch.nn.functional.pad((x > 0).to(torch.uint8), (0, -x.shape[-1] % 8))   # (N, r, 8 ceil(D/8))
        shifts = torch.arange(8, device=x.device, dtype=torch.uint8)
        codes = (bits.unflatten(-1, (-1, 8)) << shifts).sum(-1, dtype=torch.uint8)      # (N, r, ceil(D/8))
    else:
        raise ValueError(f"precision {precision!r}: quantized indexes are {' or '.join(QUANTIZED)}")
    return Quantized(precision, codes, scale.contiguous(), x.shape[-1])


class Quantized:
    """Candidate vectors in fewer bits: codes (N, r, D) int8 or (N, r, ceil(D/8)) uint8 sign bits,
    and scale (N, r) float32. Slices like an (N, r, D) tensor (rows, and prefix views c[:, :r]
    through the codes' strides); maxsim scores it directly (dequantised chunk by chunk, or
    expanded in the C kernel's registers)."""

    def __init__(self, precision, codes, scale, D):
        self.precision, self.codes, self.scale, self.D = Precision.parse(precision), codes, scale, D
        self.shape = (codes.shape[0], codes.shape[1], D)
        self.row_bytes = codes.shape[1] * vector_bytes(D, precision)
        self.device, self.dtype = codes.device, codes.dtype

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        rows, vecs = key if isinstance(key, tuple) else (key, slice(None))
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        return Quantized(self.precision, self.codes[rows, vecs], self.scale[rows, vecs], self.D)

    def to(self, device, non_blocking=False):
        return Quantized(self.precision, self.codes.to(device, non_blocking=non_blocking),
                         self.scale.to(device, non_blocking=non_blocking), self.D)

    def dequantize(self, dtype=torch.float32, out=None):
        """-> (N, r, D) in dtype (into out, if given): scale * code, or scale * sign."""
        N, r, D = self.shape
        if self.precision == "int8":
            x = self.codes.to(dtype)
        else:   # bits -> +-1: bit d % 8 of byte d // 8
            shifts = torch.arange(8, device=self.codes.device, dtype=torch.uint8)
            bits = (self.codes[..., None] >> shifts) & 1                               # (N, r, D/8, 8)
            x = (bits.view(N, r, -1)[..., :D].to(dtype) * 2 - 1)
        out = torch.empty(N, r, D, dtype=dtype, device=self.codes.device) if out is None else out
        return torch.mul(x, self.scale[..., None].to(dtype), out=out)


def group_bounds(R_c, groups):
    """Vector ranges stored together: the groups' r_c, e.g. (0,1) (1,4) (4,8) (8,16) (16,64)."""
    ends = sorted({rc for _, rc in groups if rc <= R_c} | {R_c})
    return list(zip([0] + ends[:-1], ends))


def keep_float(spec, R_c, groups, precision):
    """--keep-float's value (all, none, or a stored r_c: the float copy of vectors 1..r_c, what a
    cascade rescoring at that r_c reads) -> index.json's float_r_c (None: all, the field left out)."""
    ends = [b for _, b in group_bounds(R_c, groups)]
    spec = str(spec).strip().lower()
    if spec == "all":
        return None
    r_c = 0 if spec == "none" else int(spec) if spec.isdigit() else -1
    if r_c not in (0, *ends):
        raise ValueError(f"--keep-float {spec}: give all, none, or an r_c the index stores ({', '.join(map(str, ends))})")
    if precision is None or not Precision.parse(precision).quantized:
        raise ValueError(f"--keep-float {spec}: only an int8 / binary index can drop its float copy (pass --precision "
                         f"int8 or binary; a float index's vectors are its float copy)")
    return None if r_c == R_c else r_c


def create(path, N, R_c, D, groups, dtype, precision=None, float_r_c=None):
    """Empty group files for N candidates (sparse until written) -> Vectors to write into.
    precision int8 / binary: the low-bit groups too (beside the float copy, in dtype); None or a
    float precision: the float copy alone. float_r_c (keep_float's): the float copy of the first
    float_r_c vectors only (0: none; None: all)."""
    precision = Precision.parse(precision) if precision is not None else None
    os.makedirs(path, exist_ok=True)
    meta = dict(count=N, dim=D, num_candidate_tokens=R_c, groups=group_bounds(R_c, groups),
                dtype=str(Precision.parse(dtype, "dtype")))
    if precision is not None and precision.quantized:
        meta["precision"] = str(precision)
    if float_r_c is not None and float_r_c != R_c:
        meta["float_r_c"] = float_r_c
    vectors = Vectors(path, meta)
    for f, size in vectors.file_sizes():
        with open(f, "wb") as fh:
            fh.truncate(size)
    return vectors


def write_meta(path, meta):
    """index.json, atomically (search.py writes it last: its presence marks a finished index), with
    the sha256 of items.jsonl (if the folder holds one) and of index.json's own other fields, so
    that every open checks both whole (open_vectors, apps/search_index.Index)."""
    items = os.path.join(path, "items.jsonl")
    meta = json.loads(json.dumps({**meta, **({"items_sha256": file_sha256(items)} if os.path.isfile(items) else {})}))
    write_atomic(os.path.join(path, "index.json"), json.dumps({**meta, "meta_sha256": meta_digest(meta)}))


def meta_digest(meta):
    """sha256 of index.json's fields but its own checksum (canonical JSON: sorted keys)."""
    return hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "meta_sha256"},
                                     sort_keys=True).encode()).hexdigest()


def file_sha256(file, chunk=1 << 24):
    """sha256 of a file, read in 16 MiB pieces."""
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _whole(v, lo):
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _pairs(v):
    return isinstance(v, list) and len(v) > 0 and all(
        isinstance(p, list) and len(p) == 2 and all(_whole(x, 0) for x in p) for p in v)


def _digest(v):
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


# index.json's fields a reader relies on, each with its rule: this format's own, then what search.py
# adds (a field absent is refused only where a reader requires it)
FIELDS = {
    "count": (lambda v: _whole(v, 0), "is not a whole number >= 0"),
    "dim": (lambda v: _whole(v, 1), "is not a whole number >= 1"),
    "num_candidate_tokens": (lambda v: _whole(v, 1), "is not a whole number >= 1"),
    "groups": (_pairs, "is not a list of [start, end] pairs of whole numbers"),
    "dtype": (lambda v: v in DTYPES, f"is none of {', '.join(DTYPES)}"),
    "precision": (lambda v: v in (*DTYPES, *QUANTIZED, "bf16"), f"is none of {', '.join(QUANTIZED)} (or the dtype)"),
    "float_r_c": (lambda v: _whole(v, 0), "is not a whole number >= 0"),
    "num_query_tokens": (lambda v: _whole(v, 1), "is not a whole number >= 1"),
    "model_groups": (lambda v: _pairs(v) and all(min(p) >= 1 for p in v), "is not a list of [r_q, r_c] pairs >= 1"),
    "checkpoint": (lambda v: isinstance(v, str), "is not a string"),
    "checkpoint_rel": (lambda v: isinstance(v, str), "is not a string"),
    "fingerprint": (lambda v: v is None or isinstance(v, str), "is not a string"),
    "index_id": (lambda v: isinstance(v, str), "is not a string"),
    "backbone": (lambda v: v is None or isinstance(v, str), "is not a string"),
    "skipped": (lambda v: _whole(v, 0), "is not a whole number >= 0"),
    "checksums": (lambda v: isinstance(v, dict) and all(_digest(h) for h in v.values()),
                  "is not a map of file names to sha256 digests"),
    "items_sha256": (_digest, "is not a sha256 digest"),
    "meta_sha256": (_digest, "is not a sha256 digest"),
}


def check_meta(path, meta, required=()):
    """The one check of index.json's fields: each one's type and range (FIELDS), and how they fit
    together -> meta; else one ValueError naming the file, the field and its value."""
    def damaged(what):
        raise ValueError(f"index {path}: index.json is damaged ({what}): rebuild the index")
    if not isinstance(meta, dict):
        damaged(f"expected a JSON object, got {json.dumps(meta)[:60]}")
    missing = [k for k in ("count", "dim", "num_candidate_tokens", "groups", "dtype", *required) if k not in meta]
    if missing:
        damaged(f"missing {', '.join(missing)}")
    for k, (ok, said) in FIELDS.items():
        if k in meta and not ok(meta[k]):
            damaged(f"{k} {meta[k]!r} {said}" if isinstance(meta[k], str) else f"{k} {json.dumps(meta[k])[:80]} {said}")
    ends = [0] + [b for _, b in meta["groups"]]
    if [a for a, _ in meta["groups"]] != ends[:-1] or ends[-1] != meta["num_candidate_tokens"] or \
            any(a >= b for a, b in meta["groups"]):
        damaged(f"groups {json.dumps(meta['groups'])[:80]} are not consecutive ranges from 0 to "
                f"num_candidate_tokens {meta['num_candidate_tokens']}")
    legacy = () if "meta_sha256" in meta else ("bf16",)  # the float copy's name before index.json had a checksum
    if meta.get("precision", meta["dtype"]) not in (meta["dtype"], *QUANTIZED, *legacy):
        damaged(f"precision {meta['precision']!r} is none of {', '.join(QUANTIZED)} (or the dtype, {meta['dtype']})")
    if "float_r_c" in meta and (meta["float_r_c"] not in (0, *ends[1:]) or meta.get("precision") not in QUANTIZED):
        damaged(f"float_r_c {meta['float_r_c']} is not 0 or a group end of a low-bit index (groups "
                f"{json.dumps(meta['groups'])[:60]}, precision {meta.get('precision', meta['dtype'])})")
    return meta


def open_vectors(path, required=()):
    """The vectors of a finished index: index.json checked whole (check_meta; its own checksum,
    where it has one) and the file sizes against it (a lowered count, a truncated or swapped file
    is named, never searched in part). Each problem is one line."""
    try:
        with open(os.path.join(path, "index.json"), "rb") as f:
            meta = json.loads(f.read())
    except ValueError as e:
        raise ValueError(f"index {path}: index.json is damaged (not JSON: {e}): rebuild the index") from None
    vectors = Vectors(path, check_meta(path, meta, required))
    for f, want in vectors.file_sizes():
        have = os.path.getsize(f) if os.path.isfile(f) else None
        if have != want:
            raise ValueError(f"index {path}: {os.path.basename(f)} is {'missing' if have is None else f'{have} bytes'}, "
                             f"but index.json says {vectors.N} candidates of {vectors.D} dimensions in "
                             f"{vectors.precision} = {want}: the index is damaged; rebuild it")
    if "meta_sha256" in meta and meta_digest(meta) != meta["meta_sha256"]:
        raise ValueError(f"index {path}: index.json does not match its own checksum (edited or damaged after "
                         f"indexing): run `search.py verify {path}`, then rebuild the index")
    return vectors


def stamp(path):
    """What identifies the files of an index folder as they are now: each file's inode, size and
    mtime (an index rebuilt or swapped in place differs in at least one)."""
    out = []
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
        try:
            st = os.stat(os.path.join(path, name))
        except FileNotFoundError:
            continue
        out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def checksums(vectors):
    """sha256 of each group file: written at build time, checked by verify."""
    return {os.path.basename(f): file_sha256(f) for f, _ in vectors.file_sizes()}


def non_finite_rows(vectors, rows=4096):
    """The candidates holding a NaN or inf in any stored vector (each group file read once, a block
    of rows at a time): the float copy, and the scales of the groups it does not keep (the only
    low-bit numbers that can be NaN or inf)."""
    bad = set()
    for g, (a, b) in enumerate(vectors.bounds):
        for j in range(0, vectors.N, rows):
            n = min(rows, vectors.N - j)
            x = read_range(vectors, vectors.files[g], b - a, j, n) if g < len(vectors.files) else \
                _read_rows(vectors.scale_files[g], np.float32, (vectors.N, b - a), slice(j, j + n), vectors.path)
            bad.update((j + torch.nonzero(~torch.isfinite(x.float()).flatten(1).all(1)).flatten()).tolist())
    return sorted(bad)


def norm_bound(D, precision):
    """The largest norm a unit vector can have once stored at a precision: float32's rounding; bf16
    and fp16's (2^-9 of each number at most); int8's (half a step a number: sqrt(D) x scale / 2, the
    scale at most 1/127); binary's scale x sqrt(D) = mean|x| x sqrt(D) <= 1 (Cauchy-Schwarz)."""
    if precision == "int8":
        return 1 + D ** 0.5 / 254 + 1e-3
    return 1 + 1e-3 if precision in ("binary", "float32") else 1 + 2 ** -7


def implausible(vectors, rows, r_c, precision=None):
    """The first of `rows` (item numbers) whose first r_c stored vectors (the float copy, or the
    low-bit groups at precision) no unit vector can give: a NaN or inf, a scale above its rule's
    most (int8: 1/127, binary: 1/sqrt(D)) or a norm above norm_bound -> (row, file name, what), or
    None. Reads only those rows: cheap enough for every search's results."""
    rows = sorted(set(rows))
    if not rows:
        return None
    view = vectors.prefix(r_c, precision)
    x = view[rows]                                                        # (n, r_c, D) or Quantized
    low = isinstance(x, Quantized)
    files = vectors.code_files if low else vectors.files
    group = lambda j: next(g for g, (a, b) in enumerate(vectors.bounds) if a <= j < b)  # noqa: E731
    if low:                         # int8: max|x| / 127; binary: mean|x| <= ||x|| / sqrt(D)
        most = (1 / 127 if x.precision == "int8" else vectors.D ** -0.5) * (1 + 1e-5)
        bad = ~((x.scale >= 0) & (x.scale <= most))                       # (n, r_c); NaN is bad
        if bad.any():
            i, j = (int(t) for t in bad.nonzero()[0])
            return rows[i], os.path.basename(vectors.scale_files[group(j)]), \
                f"a scale of {float(x.scale[i, j]):.4g} (at most {most:.4g} for a unit vector)"
        x = x.dequantize()
    norms = x.float().norm(dim=-1)                                        # (n, r_c)
    limit = norm_bound(vectors.D, view.precision if low else vectors.meta["dtype"])
    bad = ~(norms <= limit)                                               # NaN and inf are bad
    if not bad.any():
        return None
    i, j = (int(t) for t in bad.nonzero()[0])
    return rows[i], os.path.basename(files[group(j)]), f"a vector of norm {float(norms[i, j]):.4g} (a unit vector's " \
        f"is 1, at most {limit:.4g} once stored)"


def read_range(vectors, file, width, start, n):
    """Rows start..start + n of one group file holding `width` vectors a candidate, with one plain
    read -> (n, width, D) in the index dtype."""
    out = torch.empty(n, width, vectors.D, dtype=vectors.dtype)
    _read_into(file, out.view(torch.uint8).numpy(), start * width * vectors.float_vector_bytes, vectors.path)
    return out


def _read_into(file, out, offset, path):
    """Fill the numpy array out from file at offset with one plain read: every byte, or an error
    (never uninitialised memory as vectors)."""
    with open(file, "rb") as fh:
        fh.seek(offset)
        got = fh.readinto(out)
    if got != out.nbytes:
        raise ValueError(f"index {path}: {os.path.basename(file)} is shorter than index.json says "
                         f"(read {got} of {out.nbytes} bytes): it changed or is damaged")


def _memmap(file, dtype, shape, path):
    """A read-only memory map of a whole group file, its size checked first (a file truncated
    after the index was opened is an error, not a crash on a page that is gone)."""
    want = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if os.path.getsize(file) < want:
        raise ValueError(f"index {path}: {os.path.basename(file)} is shorter than index.json says "
                         f"({os.path.getsize(file)} of {want} bytes): it changed or is damaged")
    return np.memmap(file, dtype=dtype, mode="r", shape=shape)


class Vectors:
    """N candidates x R_c vectors of size D in the group files. Slices like an (N, R_c, D) tensor:
    v[:, :r] is a prefix view that reads only the groups it needs; v[i:j] = x writes rows."""

    def __init__(self, path, meta):
        self.path, self.meta = os.fspath(path), meta
        self.N, self.R_c, self.D = meta["count"], meta["num_candidate_tokens"], meta["dim"]
        self.bounds = [tuple(b) for b in meta["groups"]]
        self.dtype = Precision.parse(meta["dtype"], "dtype").dtype
        self.float_vector_bytes = self.D * self.dtype.itemsize         # one vector of the float copy
        self.float_r_c = meta.get("float_r_c", self.R_c)                # the float copy: vectors 1..float_r_c
        self.files = [os.path.join(self.path, f"group-{a}-{b}.bin") for a, b in self.bounds if b <= self.float_r_c]
        self.shape = (self.N, self.R_c, self.D)
        # int8 / binary: the low-bit codes and scales of each group, beside the float copy
        self.precision = of_index(meta)                                # int8 / binary, or the float dtype
        self.quantized = self.precision.quantized
        self.code_files = [os.path.join(self.path, f"group-{a}-{b}.{self.precision}.bin") for a, b in self.bounds] \
            if self.quantized else []
        self.scale_files = [os.path.join(self.path, f"group-{a}-{b}.scale.bin") for a, b in self.bounds] \
            if self.quantized else []
        self.code_width = (self.D if self.precision == "int8" else -(-self.D // 8)) if self.quantized else None

    def file_sizes(self):
        """[(file, bytes)] of every group file: the float copy (the groups it keeps), then codes and scales."""
        out = [(f, self.N * (b - a) * self.float_vector_bytes) for (a, b), f in zip(self.bounds, self.files)]
        for (a, b), fc, fs in zip(self.bounds, self.code_files, self.scale_files):
            out += [(fc, self.N * (b - a) * self.code_width), (fs, self.N * (b - a) * 4)]
        return out

    def __len__(self):
        return self.N

    def prefix(self, r_c, precision=None):
        """The first r_c vectors of every candidate, in the float copy (precision None) or in the
        index's low-bit precision ("int8" / "binary", as index.json says)."""
        precision = Precision.parse(precision) if precision is not None else None
        if precision is None or precision == self.meta["dtype"]:
            if r_c > self.float_r_c:
                a, b = next((a, b) for a, b in self.bounds if b > self.float_r_c)
                kept = f"the float copy of vectors 1-{self.float_r_c} only" if self.float_r_c else "no float copy"
                raise ValueError(f"index {self.path} has no group-{a}-{b}.bin (built with --keep-float "
                                 f"{self.float_r_c or 'none'}: {kept}): r_c={r_c} is held in {self.precision} alone")
            return Prefix(self, r_c)
        if precision != self.precision:
            raise ValueError(f"index {self.path} holds {self.precision} vectors (and the {self.meta['dtype']} copy), "
                             f"not {precision}: rebuild it with --precision {precision}")
        return QuantizedPrefix(self, r_c)

    def rescore_view(self, r_c):
        """What a cascade rescores from at r_c: the float copy where the index keeps it, else the low
        bits (an index built with --keep-float none, or below r_c)."""
        return self.prefix(r_c, None if r_c <= self.float_r_c else self.precision)

    def __getitem__(self, key):
        rows, vecs = key if isinstance(key, tuple) else (key, slice(None))
        if vecs.start not in (None, 0) or vecs.step not in (None, 1):
            raise ValueError("only prefixes v[:, :r] can be taken from an on-disk index")
        view = self.prefix(len(range(self.R_c)[vecs]))
        return view if isinstance(rows, slice) and rows == slice(None) else view[rows]

    def __setitem__(self, rows, x):                              # rows: a slice, x (n, R_c, D)
        q = quantize(x, self.precision) if self.quantized else None
        x = x.detach().to("cpu", self.dtype).contiguous()
        for i, (a, b) in enumerate(self.bounds):
            writes = [(self.files[i], x[:, a:b], self.float_vector_bytes)] if i < len(self.files) else []
            if q is not None:
                writes += [(self.code_files[i], q.codes[:, a:b], self.code_width),
                           (self.scale_files[i], q.scale[:, a:b], 4)]
            for file, part, width in writes:
                with open(file, "r+b") as fh:
                    os.pwrite(fh.fileno(), part.contiguous().view(torch.uint8).numpy(), rows.start * (b - a) * width)

    def rows(self, start, n):
        """Rows start..start + n as an (n, R_c, D) target for model.encode_candidates(out=...)."""
        return _Rows(self, start, n)

    def low_bits(self):
        """The int8 / binary groups as one view that slices like the (N, R_c, D) tensor:
        lb[rows, :r] -> Quantized, lb[:, :r] -> a QuantizedPrefix."""
        if not self.quantized:
            raise ValueError(f"index {self.path} holds no low-bit groups (precision {self.precision})")
        return _LowBits(self)


class _LowBits:
    def __init__(self, vectors):
        self.vectors, self.shape = vectors, vectors.shape

    def __len__(self):
        return self.vectors.N

    def __getitem__(self, key):
        rows, vecs = key if isinstance(key, tuple) else (key, slice(None))
        view = self.vectors.prefix(len(range(self.vectors.R_c)[vecs]), self.vectors.precision)
        return view if isinstance(rows, slice) and rows == slice(None) else view[rows]


class _Rows:
    def __init__(self, vectors, start, n):
        self.vectors, self.start, self.shape = vectors, start, (n, vectors.R_c, vectors.D)

    def __setitem__(self, rows, x):
        self.vectors[self.start + rows.start:self.start + rows.stop] = x


class Prefix:
    """The first r_c vectors of every candidate: slices like an (N, r_c, D) tensor (a range, a
    list or a tensor of rows), reading only the group files that hold them."""

    def __init__(self, vectors, r_c):
        if not 1 <= r_c <= vectors.R_c:
            raise ValueError(f"prefix r_c={r_c} is outside the index's {vectors.R_c} vectors a candidate")
        self.vectors, self.r_c = vectors, r_c
        self.parts = [(a, b, f) for (a, b), f in zip(vectors.bounds, vectors.files) if a < r_c]
        self.shape, self.dtype = (vectors.N, r_c, vectors.D), vectors.dtype
        self.row_bytes = r_c * vectors.float_vector_bytes

    def __len__(self):
        return self.vectors.N

    def __getitem__(self, rows):
        v = self.vectors
        if isinstance(rows, slice):
            ids = range(v.N)[rows]
            if ids.step != 1:
                rows = list(ids)
        if isinstance(rows, slice):                               # one plain read a group
            parts = [read_range(v, f, b - a, ids.start, len(ids)) for a, b, f in self.parts]
        else:                                                     # rows gathered through a memory map
            rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
            store = np.float32 if v.dtype == torch.float32 else np.uint16
            parts = [torch.from_numpy(np.ascontiguousarray(
                _memmap(f, store, (v.N, b - a, v.D), v.path)[rows])).view(v.dtype)
                for a, b, f in self.parts]
        x = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return x if x.shape[1] == self.r_c else x[:, :self.r_c]  # (n, r_c, D)


def _read_rows(file, dtype, shape, rows, path):
    """Rows of one group file (N, w, ...) of numpy dtype: a slice with one plain read, a list of
    rows through a memory map."""
    N, rest = shape[0], shape[1:]
    if isinstance(rows, slice):
        ids = range(N)[rows]
        out = np.empty((len(ids), *rest), dtype=dtype)
        _read_into(file, out, ids.start * out[0:1].nbytes, path)
        return torch.from_numpy(out)
    return torch.from_numpy(np.ascontiguousarray(_memmap(file, dtype, shape, path)[rows]))


class QuantizedPrefix:
    """The first r_c vectors of every candidate in the index's int8 / binary groups: slices like an
    (N, r_c, D) tensor into Quantized, reading only the code and scale files that hold them."""

    def __init__(self, vectors, r_c):
        if not 1 <= r_c <= vectors.R_c:
            raise ValueError(f"prefix r_c={r_c} is outside the index's {vectors.R_c} vectors a candidate")
        self.vectors, self.r_c, self.precision = vectors, r_c, vectors.precision
        self.parts = [(a, b, fc, fs) for (a, b), fc, fs in zip(vectors.bounds, vectors.code_files, vectors.scale_files)
                      if a < r_c]
        self.shape = (vectors.N, r_c, vectors.D)
        self.row_bytes = r_c * vector_bytes(vectors.D, self.precision)

    def __len__(self):
        return self.vectors.N

    def __getitem__(self, rows):
        v = self.vectors
        if isinstance(rows, slice) and range(v.N)[rows].step != 1:
            rows = list(range(v.N)[rows])
        if not isinstance(rows, slice):
            rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        store = np.int8 if self.precision == "int8" else np.uint8
        codes = [_read_rows(fc, store, (v.N, b - a, v.code_width), rows, v.path) for a, b, fc, _ in self.parts]
        scale = [_read_rows(fs, np.float32, (v.N, b - a), rows, v.path) for a, b, _, fs in self.parts]
        codes, scale = (x[0] if len(x) == 1 else torch.cat(x, 1) for x in (codes, scale))
        return Quantized(self.precision, codes[:, :self.r_c], scale[:, :self.r_c], v.D)       # (n, r_c, D)
