"""The one on-disk index format, for search.py and evaluate.py --index-dir.

A folder holds the candidate vectors group by group: group-A-B.bin holds vectors A+1..B of every
candidate, (N, B - A, D) in the index dtype, for the group boundaries B of the model's
Matryoshka groups (0-1, 1-4, 4-8, 8-16, 16-64). A budget r_c reads only the groups up to r_c,
each in one contiguous run: 1/64 of the bytes at 1x1. index.json records count, dim,
num_candidate_tokens, groups and dtype (and whatever the writer adds; search.py adds the model
and the items). Vectors are written with pwrite and read with plain reads (ranges of rows) or a
memory map (lists of rows), so resident memory stays one chunk, whatever N is.
"""
import hashlib
import json
import os

import numpy as np
import torch

from machinery.checkpoints import write_atomic

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_dtype(D):
    """The one dtype rule: bf16 (the paper's index) from D = 128 up; float32 below, where bf16's
    8 bits turn near-ties of small vectors (the offline model's D = 4) into reorderings."""
    return "bfloat16" if D >= 128 else "float32"


def group_bounds(R_c, groups):
    """Vector ranges stored together: the groups' r_c, e.g. (0,1) (1,4) (4,8) (8,16) (16,64)."""
    ends = sorted({rc for _, rc in groups if rc <= R_c} | {R_c})
    return list(zip([0] + ends[:-1], ends))


def create(path, N, R_c, D, groups, dtype):
    """Empty group files for N candidates (sparse until written) -> Vectors to write into."""
    os.makedirs(path, exist_ok=True)
    meta = dict(count=N, dim=D, num_candidate_tokens=R_c, groups=group_bounds(R_c, groups), dtype=dtype)
    vectors = Vectors(path, meta)
    for (a, b), f in zip(vectors.bounds, vectors.files):
        with open(f, "wb") as fh:
            fh.truncate(N * (b - a) * vectors.vector_bytes)
    return vectors


def write_meta(path, meta):
    """index.json, atomically (search.py writes it last: its presence marks a finished index)."""
    write_atomic(os.path.join(path, "index.json"), json.dumps(meta))


def open_vectors(path, required=()):
    """The vectors of a finished index, their file sizes checked against index.json (a lowered
    count, a truncated or swapped file is named, never searched in part; a damaged index.json,
    a field of `required` missing or a dtype unknown, is one line)."""
    try:
        with open(os.path.join(path, "index.json")) as f:
            meta = json.load(f)
        missing = [k for k in ("count", "dim", "num_candidate_tokens", "groups", "dtype", *required) if k not in meta]
        if missing or meta["dtype"] not in DTYPES:
            raise ValueError(f"missing {', '.join(missing)}" if missing else
                             f"dtype {meta['dtype']!r} is none of {', '.join(DTYPES)}")
        vectors = Vectors(path, meta)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"index {path}: index.json is damaged ({e}): rebuild the index") from None
    for (a, b), f in zip(vectors.bounds, vectors.files):
        want = vectors.N * (b - a) * vectors.vector_bytes
        have = os.path.getsize(f) if os.path.isfile(f) else None
        if have != want:
            raise ValueError(f"index {path}: {os.path.basename(f)} is {'missing' if have is None else f'{have} bytes'}, "
                             f"but index.json says {vectors.N} candidates x {b - a} vectors x {vectors.D} "
                             f"{vectors.meta['dtype']} = {want}: the index is damaged; rebuild it")
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


def checksums(vectors, chunk=1 << 24):
    """sha256 of each group file, read in 16 MiB pieces: written at build time, checked by verify."""
    out = {}
    for f in vectors.files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
        out[os.path.basename(f)] = h.hexdigest()
    return out


def non_finite_rows(vectors, rows=4096):
    """The candidates holding a NaN or inf in any stored vector (each group file read once, a block
    of rows at a time)."""
    bad = set()
    for (a, b), f in zip(vectors.bounds, vectors.files):
        for j in range(0, vectors.N, rows):
            x = read_range(vectors, f, b - a, j, min(rows, vectors.N - j))          # (n, b - a, D)
            bad.update((j + torch.nonzero(~torch.isfinite(x.float()).flatten(1).all(1)).flatten()).tolist())
    return sorted(bad)


def read_range(vectors, file, width, start, n):
    """Rows start..start + n of one group file holding `width` vectors a candidate, with one plain
    read -> (n, width, D) in the index dtype."""
    out = torch.empty(n, width, vectors.D, dtype=vectors.dtype)
    with open(file, "rb") as fh:
        fh.seek(start * width * vectors.vector_bytes)
        got = fh.readinto(out.view(torch.uint8).numpy())
    if got != out.numel() * out.element_size():                   # never uninitialised memory as vectors
        raise ValueError(f"index {vectors.path}: {os.path.basename(file)} is shorter than index.json says "
                         f"(read {got} of {out.numel() * out.element_size()} bytes): it changed or is damaged")
    return out


class Vectors:
    """N candidates x R_c vectors of size D in the group files. Slices like an (N, R_c, D) tensor:
    v[:, :r] is a budget view that reads only the groups it needs; v[i:j] = x writes rows."""

    def __init__(self, path, meta):
        self.path, self.meta = os.fspath(path), meta
        self.N, self.R_c, self.D = meta["count"], meta["num_candidate_tokens"], meta["dim"]
        self.bounds = [tuple(b) for b in meta["groups"]]
        self.dtype = DTYPES[meta["dtype"]]
        self.vector_bytes = self.D * self.dtype.itemsize
        self.files = [os.path.join(self.path, f"group-{a}-{b}.bin") for a, b in self.bounds]
        self.shape = (self.N, self.R_c, self.D)

    def __len__(self):
        return self.N

    def budget(self, r_c):
        return Budget(self, r_c)

    def __getitem__(self, key):
        rows, vecs = key if isinstance(key, tuple) else (key, slice(None))
        if vecs.start not in (None, 0) or vecs.step not in (None, 1):
            raise ValueError("only prefix budgets v[:, :r] can be taken from an on-disk index")
        view = self.budget(len(range(self.R_c)[vecs]))
        return view if isinstance(rows, slice) and rows == slice(None) else view[rows]

    def __setitem__(self, rows, x):                              # rows: a slice, x (n, R_c, D)
        x = x.detach().to("cpu", self.dtype).contiguous()
        for (a, b), f in zip(self.bounds, self.files):
            part = x[:, a:b].contiguous().view(torch.uint8).numpy()
            with open(f, "r+b") as fh:
                os.pwrite(fh.fileno(), part, rows.start * (b - a) * self.vector_bytes)

    def rows(self, start, n):
        """Rows start..start + n as an (n, R_c, D) target for model.encode_candidates(out=...)."""
        return _Rows(self, start, n)


class _Rows:
    def __init__(self, vectors, start, n):
        self.vectors, self.start, self.shape = vectors, start, (n, vectors.R_c, vectors.D)

    def __setitem__(self, rows, x):
        self.vectors[self.start + rows.start:self.start + rows.stop] = x


class Budget:
    """The first r_c vectors of every candidate: slices like an (N, r_c, D) tensor (a range, a
    list or a tensor of rows), reading only the group files that hold them."""

    def __init__(self, vectors, r_c):
        if not 1 <= r_c <= vectors.R_c:
            raise ValueError(f"budget r_c={r_c} is outside the index's {vectors.R_c} vectors a candidate")
        self.vectors, self.r_c = vectors, r_c
        self.parts = [(a, b, f) for (a, b), f in zip(vectors.bounds, vectors.files) if a < r_c]
        self.shape, self.dtype = (vectors.N, r_c, vectors.D), vectors.dtype
        self.row_bytes = r_c * vectors.vector_bytes

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
                np.memmap(f, dtype=store, mode="r", shape=(v.N, b - a, v.D))[rows])).view(v.dtype)
                for a, b, f in self.parts]
        x = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return x if x.shape[1] == self.r_c else x[:, :self.r_c]  # (n, r_c, D)
