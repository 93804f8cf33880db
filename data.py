"""
Data: the offline synthetic task (the default), the benchmark task formats, the training order
(a pure function of seed and step, so --resume sees the same batches), and collate, which lays a
batch out for the loss. The hub loaders (MMEB, ViDoRe, the mixture) are in machinery/hub.py.

A training example is a dict:
    qry_text, qry_image, pos_text, pos_image, negs, source
texts are str ("" for none), images a PIL image, a path or None; negs a list of (text, image)
hard negatives (empty where the data has none); `source` names the row in errors
("MMEB-train/CIRR row 12").

A retrieval task (evaluation) is a dict:
    queries {qid: (text, image)}, corpus {docid: (text, image)}, qrels {qid: {docid: rel}}
An MMEB-eval subset is a list of rows, each ranked against its own candidates (positive first).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from machinery.backbones import ImageTextProcessor, load_image
from metaembed import prepare

# -----------------------------------------------------------------------------
# the synthetic set: grids of coloured squares, captions that name every one
#
# A scene holds 6-9 squares of 8 colours on a 3x3 grid; its hard negatives differ in one colour
# or one place. The detail is in colour AND place, both easy to see, so one small vector cannot
# hold a whole scene while several can.

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
           "yellow": (240, 220, 40), "purple": (160, 60, 200), "cyan": (40, 210, 220),
           "orange": (250, 140, 20), "white": (235, 235, 235)}
CELLS = ("top left", "top center", "top right", "middle left", "center", "middle right",
         "bottom left", "bottom center", "bottom right")
CELL = 28  # pixels; 3x3 cells make an 84x84 image: one visual token per cell (14 px patches, 2x2 merge)
OBJECTS = (6, 9)  # squares per scene, min and max


def parse_objects(spec: str) -> tuple[int, int]:
    """'6,9' -> (6, 9): squares per scene, 1 <= min <= max <= 9 (one per cell of the 3x3 grid)."""
    try:
        lo, hi = (int(x) for x in str(spec).split(","))
    except ValueError:
        raise ValueError(f"objects must be two integers min,max (e.g. 6,9), got {spec!r}") from None
    if not 1 <= lo <= hi <= len(CELLS):
        raise ValueError(f"objects {spec}: need 1 <= min <= max <= {len(CELLS)} (squares on a 3x3 grid)")
    return lo, hi


def make_scene(rng: random.Random, min_objects: int = OBJECTS[0], max_objects: int = OBJECTS[1]) -> list:
    """A scene: a sorted tuple of squares (cell, colour), at most one per cell."""
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample(range(len(CELLS)), n)
    return tuple(sorted((c, rng.choice(list(COLOURS))) for c in cells))


def caption(scene: list) -> str:
    return ", ".join(f"{colour} {CELLS[cell]}" for cell, colour in scene)


def scene_of(text: str) -> list:
    """caption's inverse: 'red top left, blue center' -> the scene ((0, 'red'), (4, 'blue'))."""
    try:
        return tuple(sorted((CELLS.index(part.split(" ", 1)[1]), part.split(" ", 1)[0]) for part in text.split(", ")))
    except (ValueError, IndexError):
        raise ValueError(f"not a synthetic caption: {text[:60]!r}") from None


def render(scene: list) -> Image.Image:
    """84x84 RGB image of a scene, drawn with Pillow."""
    im = Image.new("RGB", (3 * CELL, 3 * CELL), (20, 20, 20))
    d = ImageDraw.Draw(im)
    for cell, colour in scene:
        cx, cy = (cell % 3) * CELL + CELL // 2, (cell // 3) * CELL + CELL // 2
        d.rectangle((cx - 12, cy - 12, cx + 12, cy + 12), fill=COLOURS[colour])
    return im


def variant(scene: list, rng: random.Random) -> list:
    """A hard negative: the scene with ONE change (a colour, a move, a colour swap)."""
    objs = [list(o) for o in scene]
    while True:
        kind = rng.choice(("colour", "move", "swap"))
        i = rng.randrange(len(objs))
        new = [o[:] for o in objs]
        if kind == "colour":
            new[i][1] = rng.choice([c for c in COLOURS if c != objs[i][1]])
        elif kind == "move":
            free = [c for c in range(len(CELLS)) if c not in {o[0] for o in objs}]
            if not free:
                continue
            new[i][0] = rng.choice(free)
        else:
            j = rng.randrange(len(objs))
            if objs[i][1] == objs[j][1]:
                continue
            new[i][1], new[j][1] = objs[j][1], objs[i][1]
        out = tuple(sorted(tuple(o) for o in new))
        if out != scene:
            return out


def _split_of(scene):
    """Train / eval by a hash of the scene: disjoint by construction, stable across runs."""
    return "eval" if int(hashlib.md5(caption(scene).encode()).hexdigest(), 16) % 10 == 0 else "train"


def synthetic_scene(split: str, i: int, seed: int = 0, min_objects: int = OBJECTS[0], max_objects: int = OBJECTS[1]) -> list:
    """The i-th scene of a split (deterministic by seed)."""
    for attempt in range(1000):
        rng = random.Random(f"{seed}-{split}-{i}-{attempt}")
        scene = make_scene(rng, min_objects, max_objects)
        if _split_of(scene) == split:
            return scene
    raise RuntimeError("no scene found for the split")  # unreachable in practice


class SyntheticPairs(torch.utils.data.Dataset):
    """Training pairs: text->image or image->text (half each), each with a one-change hard negative."""

    def __init__(self, size=20000, seed=0, min_objects=OBJECTS[0], max_objects=OBJECTS[1]):
        self.size, self.seed, self.objects = size, seed, (min_objects, max_objects)

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        if not 0 <= i < self.size:
            raise IndexError(i)
        scene = synthetic_scene("train", i, self.seed, *self.objects)
        rng = random.Random(f"{self.seed}-pair-{i}")
        neg = variant(scene, rng)
        if rng.random() < 0.5:  # text -> image
            return dict(qry_text=caption(scene), qry_image=None, pos_text="", pos_image=render(scene),
                        negs=[("", render(neg))], source=f"synthetic row {i}")
        return dict(qry_text="", qry_image=render(scene), pos_text=caption(scene), pos_image=None,
                    negs=[(caption(neg), None)], source=f"synthetic row {i}")


def synthetic_eval(n_scenes: int = 300, n_variants: int = 3, seed: int = 0, min_objects: int = OBJECTS[0],
                   max_objects: int = OBJECTS[1]) -> dict:
    """Two retrieval tasks over one corpus of eval scenes and their one-change variants:
    t2i (caption -> every image) and i2t (image -> every caption). One relevant item per query."""
    scenes, seen = [], set()
    for i in range(n_scenes):
        s = synthetic_scene("eval", i, seed, min_objects, max_objects)
        if s not in seen:
            seen.add(s)
            scenes.append(s)
    corpus_scenes = {}
    for k, s in enumerate(scenes):
        corpus_scenes[f"s{k}"] = s
        rng = random.Random(f"{seed}-eval-variants-{k}")
        for v in range(n_variants):
            corpus_scenes[f"s{k}v{v}"] = variant(s, rng)
    ids = [f"s{k}" for k in range(len(scenes))]
    return {
        "t2i": dict(queries={f"q{q}": (caption(corpus_scenes[q]), None) for q in ids},
                    corpus={d: ("", render(s)) for d, s in corpus_scenes.items()},
                    qrels={f"q{q}": {q: 1} for q in ids}),
        "i2t": dict(queries={f"q{q}": ("", render(corpus_scenes[q])) for q in ids},
                    corpus={d: (caption(s), None) for d, s in corpus_scenes.items()},
                    qrels={f"q{q}": {q: 1} for q in ids}),
    }


# -----------------------------------------------------------------------------
# benchmarks

# MMEB: the 36 evaluation subsets by meta-task; the first 20 listed in IND are the training ones.
MMEB_TASKS = {
    "Classification": ["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
                       "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"],
    "VQA": ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
            "ScienceQA", "VizWiz", "GQA", "TextVQA"],
    "Retrieval": ["VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
                  "NIGHTS", "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"],
    "Grounding": ["MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"],
}
MMEB_OOD = {"Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211", "ScienceQA", "VizWiz",
            "GQA", "TextVQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS", "RefCOCO", "RefCOCO-Matching",
            "Visual7W-Pointing"}
MMEB_SUBSETS = [s for subsets in MMEB_TASKS.values() for s in subsets]


# -----------------------------------------------------------------------------
# data order: a function of (seed, step) only, so a resumed run sees the same batches

def batch_indices(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """Indices of the global batch at `step`: epoch-wise seeded permutations, last partial dropped."""
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"the data has {n} examples, fewer than one global batch of {global_batch}")
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[k * global_batch:(k + 1) * global_batch].tolist()


@dataclass(frozen=True)
class Order:
    """Whose batches, and which: `batch` examples a rank, `world` ranks, this `rank`, the `seed`,
    steps [start, steps)."""
    batch: int
    world: int = 1
    rank: int = 0
    seed: int = 0
    start: int = 0
    steps: int = 0


class StepBatches(torch.utils.data.Sampler):
    """This rank's share of batch_indices at each step of `order`, over n examples."""

    def __init__(self, n: int, order: Order):
        self.n, self.order = n, order

    def __iter__(self):
        o = self.order
        for step in range(o.start, o.steps):
            yield batch_indices(step, self.n, o.batch * o.world, o.seed)[o.rank * o.batch:(o.rank + 1) * o.batch]

    def __len__(self):
        return self.order.steps - self.order.start


class MixtureBatches(torch.utils.data.Sampler):
    """This rank's batches of a machinery.hub.Mixture, the official interleaving (interleave_datasets with
    stopping_strategy="all_exhausted", then split_dataset_by_node), as a pure function of the step:

    - one global stream of runs: run g is `run` consecutive examples of one source, drawn WITH
      replacement with probability weight / sum(weights) (a seeded uniform per run, in blocks);
    - a source's examples are its rows in a seeded order; an exhausted source restarts with a new
      order (pass e of source k: permutation (seed, k, e)), so shares follow the weights however long
      the run, and a pass never repeats a row;
    - rank r takes runs r, r + world, r + 2 world, ...: no two ranks see the same example of a pass;
      its step-s batch is examples [s B, (s + 1) B) of its runs, laid end to end;
    - buffer > 0: that stream first passes through a shuffle buffer of `buffer` examples (the
      official IterableDataset.shuffle(seed=42) after the split: each output is a seeded-random
      pick from the buffer, replaced by the next example), which mixes the runs of a batch."""

    BLOCK = 4096  # runs whose source is drawn by one seeded generator (and buffer picks per generator)

    def __init__(self, mixture, order: Order, run: int, buffer: int = 0):
        self.mixture, self.settings, self.run, self.buffer = mixture, order, run, buffer
        self.order = np.zeros(0, dtype=np.int64)    # buffer > 0: output j -> stream position
        self.buf, self.next = np.arange(buffer, dtype=np.int64), buffer
        self.sizes = np.array([len(s) for s in mixture.sources])
        w = np.array(mixture.weights, dtype=float)
        self.cdf = np.cumsum(w / w.sum())
        self.src = np.zeros(0, dtype=np.int64)      # (G,) the source of each global run drawn so far
        self.nth = np.zeros(0, dtype=np.int64)      # (G,) how many runs of that source came before it
        self.perms = {}

    def _runs(self, G):
        """Draw the sources of global runs [0, G) (block by block, each block its own generator)."""
        seed = self.settings.seed
        while len(self.src) < G:
            b = len(self.src) // self.BLOCK
            u = np.random.default_rng([seed, 7919, b]).random(self.BLOCK)
            k = np.minimum(np.searchsorted(self.cdf, u, side="right"), len(self.cdf) - 1)
            self.src = np.concatenate([self.src, k])
        nth = np.empty(len(self.src), dtype=np.int64)
        for k in range(len(self.cdf)):                # the i-th run of source k has nth = i
            mask = self.src == k
            nth[mask] = np.arange(mask.sum())
        self.nth = nth

    def _perm(self, k, e):
        if (k, e) not in self.perms:
            self.perms.pop((k, e - 2), None)          # passes are consumed in order
            self.perms[(k, e)] = np.random.default_rng([self.settings.seed, 104729 + k, e]).permutation(self.sizes[k])
        return self.perms[(k, e)]

    def _stream(self, positions):
        """Output positions -> positions of the rank's stream of runs (the same without a buffer)."""
        positions = np.asarray(positions, dtype=np.int64)
        if not self.buffer or not len(positions):
            return positions
        seed, rank = self.settings.seed, self.settings.rank
        while len(self.order) <= positions.max():    # replayed from the start: a function of the position
            b = len(self.order) // self.BLOCK
            picks = np.random.default_rng([seed, rank, 65537, b]).integers(0, self.buffer, self.BLOCK)
            out = np.empty(self.BLOCK, dtype=np.int64)
            for j, i in enumerate(picks.tolist()):
                out[j], self.buf[i] = self.buf[i], self.next
                self.next += 1
            self.order = np.concatenate([self.order, out])
        return self.order[positions]

    def examples(self, positions: np.ndarray | range) -> tuple[np.ndarray, np.ndarray]:
        """Rank-local output positions (array) -> (source, row) arrays."""
        world, rank, run = self.settings.world, self.settings.rank, self.run
        i, o = np.divmod(self._stream(positions), run)
        g = i * world + rank                          # the global run each position falls in
        if len(g) and g.max() >= len(self.src):
            self._runs(int(g.max()) + 1)
        k = self.src[g]
        t = self.nth[g] * run + o                     # position in source k's own endless stream
        e, r = np.divmod(t, self.sizes[k])
        rows = np.array([self._perm(int(kk), int(ee))[rr] for kk, ee, rr in zip(k, e, r)], dtype=np.int64)
        return k, rows

    def batch(self, step: int) -> list[tuple[int, int]]:
        B = self.settings.batch
        k, rows = self.examples(np.arange(step * B, (step + 1) * B))
        return list(zip(k.tolist(), rows.tolist()))

    def seen(self, step: int) -> dict[str, int]:
        """Examples of each source this rank has trained on after `step` steps (for the log)."""
        B, world, rank, run = self.settings.batch, self.settings.world, self.settings.rank, self.run
        p = self._stream(np.arange(step * B))
        g = (p // run) * world + rank
        if len(g) and g.max() >= len(self.src):
            self._runs(int(g.max()) + 1)
        counts = np.bincount(self.src[g], minlength=len(self.sizes)) if len(g) else np.zeros(len(self.sizes), int)
        return dict(zip(self.mixture.names, counts.tolist()))

    def __iter__(self):
        for step in range(self.settings.start, self.settings.steps):
            yield self.batch(step)

    def __len__(self):
        return self.settings.steps - self.settings.start


# -----------------------------------------------------------------------------
# collate: examples -> backbone inputs

def collate(examples: list[dict], processor: ImageTextProcessor, query_suffix: bool = False, num_negatives: int = 1) -> tuple:
    """-> (query inputs, candidate inputs, neg_mask). Candidates = the B positives, then K =
    num_negatives hard negatives per query (B * K more rows, query-major) where any example has
    one: an example with fewer than K repeats its last (as the official collator), one with none
    gets its positive as a stand-in, masked out by neg_mask (B, K) (False = no negative there)."""
    B, K = len(examples), num_negatives
    cands = [(e["pos_text"], e["pos_image"], e["source"]) for e in examples]
    neg_mask = None
    if K > 0 and any(e["negs"] for e in examples):
        for e, pos in zip(examples, list(cands)):
            negs = [(t, im, e["source"]) for t, im in e["negs"][:K]]
            cands += negs + negs[-1:] * (K - len(negs)) if negs else [pos] * K
        neg_mask = torch.tensor([bool(e["negs"]) for e in examples])[:, None].expand(B, K).clone()
    q = prepare(processor, [e["qry_text"] for e in examples],
                [_image(e["qry_image"], e["source"]) for e in examples], "query", query_suffix=query_suffix)
    c = prepare(processor, [t or "" for t, _, _ in cands], [_image(i, s) for _, i, s in cands], "candidate")
    skipped = [said for e in examples for said in e.get("skipped", ())]
    if skipped:                  # rows skipped for these examples (--skip-bad-rows): for the log, beside the tensors
        q["skipped_rows"] = skipped
    return q, c, neg_mask


def _image(image, source):
    """Load an image up front so a missing or unreadable file is named with its row."""
    return None if image is None else load_image(image, f" ({source})")
