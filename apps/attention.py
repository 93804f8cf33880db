"""
What each Meta Token reads (explain.py's library): the candidate meta tokens' last-layer attention
over the merged visual-token grid, per Matryoshka group, a query's winning vectors, the study.
A map is NOT renormalised: its sum is the share of that meta token's attention that falls on the
image (the rest goes to the text, the prompt and the earlier meta tokens). The language model
runs eager attention for this pass only (its own implementation is restored after; the vision
tower keeps its own), and a hook keeps only the candidate meta tokens' rows of the layers asked
for: one layer's full attention exists at a time, never every layer's.
"""
import math
from contextlib import contextmanager

import torch

import data
from machinery.backbones import load_image
from maxsim import maxsim
from metaembed import Budget, matryoshka_groups

@contextmanager
def meta_attention(model, layers=(-1,)):
    """While inside: eager attention, and the candidate meta tokens' attention rows of `layers`
    (mean over heads) appended to the yielded list, one (R_c, L) tensor per layer and forward."""
    language, R_c = model.base_model().language_model, model.config.num_candidate_tokens
    kept, hooks = [], []
    before = language.config._attn_implementation    # the language model's only: the vision tower keeps its own

    def keep(module, args, output):
        weights = output[1]                                               # (B, heads, L, L), eager only
        kept.append(weights[0, :, -R_c:, :].float().mean(0))              # (R_c, L)
    try:
        language.config._attn_implementation = "eager"          # read by every layer at each forward
        hooks = [language.layers[i].self_attn.register_forward_hook(keep) for i in layers]
        yield kept
    finally:
        for h in hooks:
            h.remove()
        language.config._attn_implementation = before


def visual_grid(model, inputs):
    """The positions of the image's visual tokens in the candidate's input, and the merged grid
    (rows, cols) they fill in row-major order: (height / patch / merge, width / patch / merge)."""
    ids = inputs["input_ids"][0]
    positions = torch.nonzero(ids == model.backbone.config.image_token_id).flatten()
    _, h, w = inputs["image_grid_thw"][0].tolist()
    merge = model.processor.image_processor.merge_size
    return positions, (h // merge, w // merge)


@torch.no_grad()
def explain(model, image, text="", query=None, budget=None, layers=(-1,)):
    """-> dict: grid [rows, cols], maps (R_c, rows, cols) and group_maps {Budget: (rows, cols)} of the
    candidate (image, text); with query, the attribution at budget (r_q, r_c)."""
    if image is None:
        raise ValueError("the candidate has no image: there is nothing to map (explain maps visual tokens)")
    inputs = model.prepare([text], [image], "candidate")
    positions, (rows, cols) = visual_grid(model, inputs)
    with meta_attention(model, layers) as kept:
        E_c = model.embed(inputs, "candidate")[0]                         # (R_c, D)
    attn = torch.stack(kept).mean(0)                                      # (R_c, L + R_q + R_c)
    maps = attn[:, positions].view(-1, rows, cols)                        # (R_c, rows, cols)
    out = {"grid": [rows, cols], "maps": maps, "group_maps": {}, "query": None}
    lo = 0
    for g in paper_groups(model):                                         # vectors lo+1..r_c: one group
        out["group_maps"][g] = maps[lo:g.r_c].mean(0)
        lo = g.r_c
    if query is not None:
        r_q, r_c = budget
        E_q = model.encode_queries([query])[0]                            # (R_q, D)
        dots = E_q[:r_q] @ E_c[:r_c].T                                    # (r_q, r_c): <E_q^i, E_c^j>
        contribution, winner = dots.max(1)                                # max_j, and which j
        out["query"] = {"text": query, "budget": [r_q, r_c], "winner": winner.tolist(),
                        "contribution": contribution.tolist(), "score": float(contribution.sum()),
                        "maxsim": float(maxsim(E_q[None, :r_q], E_c[None, :r_c], backend="torch")[0, 0])}
    return out


def paper_groups(model):
    """The paper's groups within the model's tokens (an ablation trained on (16, 64) alone is still
    read as vector 1, 2-4, 5-8, 9-16, 17-64)."""
    return matryoshka_groups(model.config.num_query_tokens, model.config.num_candidate_tokens)


def to_json(result):
    listed = lambda t: [[round(float(v), 7) for v in row] for row in t]  # noqa: E731
    return {"grid": result["grid"], "maps": [listed(m) for m in result["maps"]],
            "group_maps": {str(g): listed(m) for g, m in result["group_maps"].items()}, "query": result["query"]}


def figure(result, image, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups, q = result["group_maps"], result["query"]
    n = max(1 + len(groups), len(q["winner"][:8]) if q else 0)
    fig, axes = plt.subplots(2 if q else 1, n, figsize=(2.2 * n, 4.6 if q else 2.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    rgb = load_image(image)                              # as the model saw it (16-bit scaled, not white)

    shown = list(groups.values()) + ([result["maps"][j] for j in q["winner"][:8]] if q else [])
    top = max(float(m.max()) for m in shown)             # one colour scale for every panel: 0 .. top

    def overlay(ax, m, title):                       # the map over the image in grey, brighter = more attention
        ax.imshow(rgb.convert("L"), cmap="gray")
        ax.imshow(m.numpy(), extent=(0, rgb.width, rgb.height, 0), cmap="inferno", alpha=0.75, interpolation="nearest",
                  vmin=0, vmax=top)
        ax.set_title(title, fontsize=8)
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title("candidate", fontsize=8)
    lo = 0
    for ax, (g, m) in zip(axes[0, 1:], groups.items()):
        hi = g.r_c
        overlay(ax, m, f"vectors {lo + 1}-{hi}: {float(m.sum()):.2f} on image" if hi > lo + 1 else
                f"vector 1: {float(m.sum()):.2f} on image")
        lo = hi
    if q:
        for i, (ax, j, c) in enumerate(zip(axes[1], q["winner"][:8], q["contribution"])):
            overlay(ax, result["maps"][j], f"q{i + 1} -> c{j + 1}: {c:.3f}")
        fig.suptitle(f"{q['text'][:60]!r} at {q['budget'][0]}x{q['budget'][1]}: score {q['score']:.3f} "
                     f"(sum of the contributions); colour 0 .. {top:.3f} of a token's attention", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# the study: what each group of vectors attends to on the synthetic scenes

def study(model, n_scenes=50, seed=0):
    """Per Matryoshka group, mean over scenes and the group's vectors: the share of its attention on
    the image (a map's sum), and (a) the entropy (nats) of
    its attention over the visual tokens (each map normalised to a distribution for this alone),
    (b) the share of its image attention on the coloured squares, (c) distinct argmax cells among
    its vectors. The scenes are 3x3 grids of 28 px cells: one visual token a cell. Beside each,
    what attention spread evenly would give: ln 9, the squares' share of the cells, and the
    distinct cells of as many argmaxes drawn at random, 9 (1 - (8/9)^k)."""
    rows, squares = {}, 0.0
    for i in range(n_scenes):
        scene = data.synthetic_scene("eval", i, seed)
        res = explain(model, data.render(scene))
        full = torch.zeros(9, dtype=torch.bool)
        full[[cell for cell, _ in scene]] = True
        squares += float(full.float().mean()) / n_scenes
        maps = res["maps"].flatten(1)                                     # (R_c, 9)
        lo = 0
        for rq, rc in paper_groups(model):
            m = maps[lo:rc]
            p = m / m.sum(1, keepdim=True)
            r = rows.setdefault(str(Budget(rq, rc)), {"on_image": 0.0, "entropy": 0.0, "on_squares": 0.0, "cells": 0.0,
                                               "cells_at_random": 9 * (1 - (8 / 9) ** (rc - lo))})
            r["on_image"] += float(m.sum(1).mean()) / n_scenes
            r["entropy"] += float(-(p * p.clamp_min(1e-12).log()).sum(1).mean()) / n_scenes
            r["on_squares"] += float((m[:, full].sum(1) / m.sum(1)).mean()) / n_scenes
            r["cells"] += len(set(m.argmax(1).tolist())) / n_scenes
            lo = rc
    for r in rows.values():
        r["squares_share_of_cells"] = squares
    return rows


def print_study(name, rows):
    even = next(iter(rows.values()))["squares_share_of_cells"]
    print(f"\n{name}: per group, mean over scenes (spread evenly: entropy {math.log(9):.2f} nats, "
          f"{even:.3f} on squares)")
    print(f"{'group':>7} {'on image':>9} {'entropy':>8} {'on squares':>11} {'distinct cells':>15} {'at random':>10}")
    for g, r in rows.items():
        print(f"{g:>7} {r['on_image']:9.3f} {r['entropy']:8.3f} {r['on_squares']:11.3f} {r['cells']:15.2f} "
              f"{r['cells_at_random']:10.2f}")
