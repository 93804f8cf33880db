"""Checks at the boundary: each bad input is one line that names it (the flag, the file, the
count), raised before any work starts. Only the command-line tools print."""
import math
import os
import re


def at_least(error, args, **bounds):
    """error(msg) for the first --flag below its bound (None: not given, fine)."""
    for k, lo in bounds.items():
        v = getattr(args, k, None)
        if v is not None and v < lo:
            error(f"--{k.replace('_', '-')} must be at least {lo}, got {v}")


def positive(error, args, *names):
    """error(msg) for the first --flag that is given and not a positive finite number."""
    for k in names:
        v = getattr(args, k, None)
        if v is not None and not (v > 0 and math.isfinite(v)):
            error(f"--{k.replace('_', '-')} must be a positive number, got {v}")


def writable_file(error, flag, path):
    """A file written at the end (--output, --plot, --log-file): its folder exists and can be
    written, and it is not a folder. Checked before hours of work, not after."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        error(f"cannot write {flag} {path} (it is a folder)")
    elif not os.path.isdir(folder) or not os.access(folder, os.W_OK) or \
            (os.path.exists(path) and not os.access(path, os.W_OK)):
        error(f"cannot write {flag} {path} (no such folder, or not writable)")


def writable_dir(error, flag, path):
    """A folder written into (--out, --index-dir): made if missing, and a file can be created in it."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        error(f"cannot write {flag} {path} ({e.strerror or e})")


def parses(error, flag, parse, value):
    """A flag's value that `parse` refuses (a ValueError) -> error('--flag ...: why'); None is not checked."""
    if value is not None:
        try:
            parse(value)
        except ValueError as e:
            error(f"--{e}" if str(e).startswith(flag.lstrip("-")) else f"{flag}: {e}")   # the message names it, or not


def refuse(message):
    """The `error` of the checks above for library code and train.py: one line, as an exception."""
    raise PermissionError(message)


def check_maxsim_inputs(q, c, q_mask=None, c_mask=None):
    if len(q.shape) != 3 or len(c.shape) != 3:
        raise ValueError(f"maxsim wants q (N_q, r_q, D) and c (N_c, r_c, D), got {tuple(q.shape)} "
                         f"and {tuple(c.shape)}")
    if q.shape[-1] != c.shape[-1]:
        raise ValueError(f"embedding sizes differ: q has D={q.shape[-1]}, c has D={c.shape[-1]}")
    for name, x, m in (("q_mask", q, q_mask), ("c_mask", c, c_mask)):
        if m is not None and tuple(m.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{name} has shape {tuple(m.shape)}, expected {tuple(x.shape[:2])}")
        if m is not None and m.dtype.is_floating_point:    # 0.5: True to torch, 0 as the C kernel's byte
            raise ValueError(f"{name} is {m.dtype}: give a bool mask (True = a real vector)")


def check_encode_inputs(texts, images, batch_size):
    """-> (texts, images) as lists of equal length, or one line saying what is wrong."""
    if isinstance(texts, str):
        raise TypeError(f"texts must be a list of strings, got one string ({texts[:40]!r}): wrap it in a list")
    texts = list(texts)
    images = [None] * len(texts) if images is None else list(images)
    if len(images) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(images)} images: give one image (or None) per text")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return texts, images


def check_budget(spec, named, limits, stored=None, name="budget"):
    """metaembed's budget rule at the boundary: spec 'AxB', a number k (the first of `named`, pairs
    (r_q, r_c), whose r_c == k) or a pair (A, B) -> (r_q, r_c) within limits (R_q, R_c) and, where
    `stored` is given, with r_c among them; anything else is one ValueError naming `name`, the
    budget and what would be accepted."""
    (R_q, R_c), text = limits, "x".join(str(x) for x in spec) if isinstance(spec, (tuple, list)) else str(spec).strip()

    def bad(why):
        accepted = ", ".join(f"{a}x{b}" for a, b in sorted(named, key=lambda g: (g[1], g[0])))
        return ValueError(f"{name} {text[:40]!r}{'...' if len(text) > 40 else ''}: {why} (a budget is r_q x r_c "
                          f"like 2x4 within {R_q}x{R_c}, or a number naming a group's r_c: {accepted})")
    if isinstance(spec, (tuple, list)) and not (len(spec) == 2 and all(type(x) is int for x in spec)):
        raise bad("a pair must be two whole numbers (r_q, r_c)")
    if not isinstance(spec, (tuple, list, str, int)) or isinstance(spec, bool):
        raise bad(f"a {type(spec).__name__} is not a budget")
    if not text:
        raise bad("empty")
    if m := re.fullmatch(r"(-?\d{1,6})x(-?\d{1,6})", text):
        r_q, r_c = int(m.group(1)), int(m.group(2))
    elif re.fullmatch(r"\d{1,6}", text):
        match = [g for g in named if g[1] == int(text)]
        if not match:
            raise bad(f"no Matryoshka group has {text} candidate vectors")
        r_q, r_c = match[0]
    else:
        raise bad("not a number or 'AxB'")
    if r_q < 1 or r_c < 1:
        raise bad("r_q and r_c must be at least 1")
    if r_q > R_q or r_c > R_c:
        raise bad(f"{r_q}x{r_c} exceeds the trained meta tokens (R_q={R_q}, R_c={R_c})")
    if stored is not None and r_c not in stored:
        raise bad(f"r_c={r_c} is not stored in this index, which holds r_c in {', '.join(map(str, stored))}")
    return r_q, r_c


def check_groups(groups, num_query_tokens, num_candidate_tokens):
    """Groups must be nested prefixes: non-decreasing, and within the trained tokens."""
    if not groups:
        raise ValueError("groups is empty: give at least one (r_q, r_c) pair")
    for (rq, rc), prev in zip(groups, ((0, 0),) + tuple(groups[:-1])):
        if rq < 1 or rc < 1:
            raise ValueError(f"group {(rq, rc)}: r_q and r_c must be at least 1")
        if rq > num_query_tokens or rc > num_candidate_tokens:
            raise ValueError(f"group {(rq, rc)} exceeds the meta tokens "
                             f"(R_q={num_query_tokens}, R_c={num_candidate_tokens})")
        if rq < prev[0] or rc < prev[1]:
            raise ValueError(f"groups must grow coarse to fine, got {prev} before {(rq, rc)}")


def maxsim_float64(q, c, q_mask=None, c_mask=None):
    """The one verification reference of MaxSim (the kernels' self-checks, the tests):
    s(q, c) = sum over real i of max over real j of <q_i, c_j>, in float64, q (N_q, r_q, D),
    c (N_c, r_c, D), masks (N, r) bool (True = real) -> (N_q, N_c) float64. A padded candidate
    vector never wins, a candidate with no real vector scores 0, a padded query vector adds 0, and
    a NaN product makes its maximum NaN (as torch's amax)."""
    import torch
    s = torch.einsum("aid,njd->anij", torch.as_tensor(q).double(), torch.as_tensor(c).double())  # (N_q, N_c, r_q, r_c)
    if c_mask is not None:
        cm = torch.as_tensor(c_mask).bool()
        s = s.masked_fill(~cm[None, :, None, :], float("-inf"))
    best = s.amax(-1)                                                                # (N_q, N_c, r_q)
    if c_mask is not None:
        best = best.masked_fill(~cm.any(1)[None, :, None], 0.0)
    if q_mask is not None:
        best = best.masked_fill(~torch.as_tensor(q_mask).bool()[:, None, :], 0.0)
    return best.sum(-1)
