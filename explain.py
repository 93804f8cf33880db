"""
See what each Meta Token reads: the last layer's attention from each candidate meta token to the
image's visual tokens, laid out on the merged visual-token grid and grouped by Matryoshka group;
with a query, the image regions that answered each query vector at a budget.

    python explain.py --out explain.png                       # the offline checkpoint, a synthetic scene
    python explain.py --checkpoint CK --image IMG --query "red top left" --budget 2x4 --out FIG.png --json OUT.json
    python explain.py --study 50 --compare out/tiny-no-matryoshka   # the measured study (table, JSON)

The maps, the attribution and the study are apps/attention.py.
"""
import argparse
import json
import os
import sys

import data
from apps.attention import explain, figure, print_study, study, to_json
from machinery import checks
from machinery.checkpoints import DEFAULT_CHECKPOINT
from metaembed import load_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a checkpoint or train.py --out folder "
                   "(default: the offline run's)")
    p.add_argument("--image", help="the candidate image (default: synthetic eval scene 0)")
    p.add_argument("--text", default="", help="the candidate's text, if any")
    p.add_argument("--query", help="a query: which regions answered each of its vectors")
    p.add_argument("--budget", default="16x64", help="with --query: r_q x r_c (default 16x64)")
    p.add_argument("--layers", type=int, nargs="+", default=[-1], help="language-model layers to average "
                   "(default: the last alone, -1)")
    p.add_argument("--out", help="the figure (PNG)")
    p.add_argument("--json", help="maps, group maps and the attribution as JSON")
    p.add_argument("--study", type=int, metavar="N", help="instead: the study over N synthetic eval scenes")
    p.add_argument("--compare", help="with --study: a second checkpoint (e.g. the --no-matryoshka ablation)")
    args = p.parse_args(argv)
    if args.study is not None and args.study < 1:
        p.error(f"--study {args.study}: the number of scenes must be at least 1")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.backend_bases import FigureCanvasBase
        ext = os.path.splitext(args.out)[1].lower().lstrip(".")
        kinds = FigureCanvasBase.get_supported_filetypes()
        if not ext:
            args.out += ".png"                     # what matplotlib would write; said as written
        elif ext not in kinds:
            p.error(f"--out {args.out}: .{ext} is not a figure format ({', '.join(sorted(kinds))})")
    for flag, path in (("--out", args.out), ("--json", args.json)):
        if path:
            checks.writable_file(p.error, flag, path)
    try:
        model, found = load_model(args.checkpoint, "explain.py")
        layers = model.base_model().language_model.layers
        depth = len(layers)
        bad = [i for i in args.layers if not -depth <= i < depth]
        if bad:
            raise ValueError(f"--layers {bad}: the language model has {depth} layers (0..{depth - 1}, or -1 for the last)")
        twice = sorted({i % depth for i in args.layers if [j % depth for j in args.layers].count(i % depth) > 1})
        if twice:
            raise ValueError(f"--layers {' '.join(map(str, args.layers))}: names layer {twice[0]} twice (-1 is "
                             f"layer {depth - 1})")
        maps = [i for i, layer in enumerate(layers) if hasattr(layer, "self_attn")]   # Qwen3.5: 1 in 4 layers
        linear = [i for i in args.layers if i % depth not in maps]
        if linear:
            raise ValueError(f"--layers {linear[0]}: layer {linear[0] % depth} is linear attention and has no "
                             f"attention map; the layers with maps are {', '.join(map(str, maps))}")
        if args.study:
            results = {found: study(model, args.study)}
            if args.compare:
                other, where = load_model(args.compare, "explain.py")
                results[where] = study(other, args.study)
            for name, rows in results.items():
                print_study(name, rows)
            if args.json:
                json.dump(results, open(args.json, "w"), indent=2)
            return results
        scene = data.synthetic_scene("eval", 0)
        image = args.image or data.render(scene)
        query = args.query if args.query is not None else (None if args.image else data.caption(scene))
        budget = model.config.budget(args.budget, name="--budget") if query is not None else None
        result = explain(model, image, args.text, query, budget, tuple(args.layers))
    except (ValueError, FileNotFoundError, TypeError) as e:
        sys.exit(f"explain.py: error: {e}")
    q = result["query"]
    print(f"{found}: {result['grid'][0]}x{result['grid'][1]} visual tokens; share of each group's attention on the "
          "image: " + ", ".join(f"{k} {float(m.sum()):.2f}" for k, m in result["group_maps"].items()))
    if q:
        print(f"query {q['text'][:60]!r} at {q['budget'][0]}x{q['budget'][1]}: score {q['score']:.4f}; winners "
              + ", ".join(f"q{i + 1}->c{j + 1} ({c:.3f})" for i, (j, c) in enumerate(zip(q["winner"], q["contribution"]))))
    if args.json:
        json.dump(to_json(result), open(args.json, "w"))
        print(f"wrote {args.json}")
    if args.out:
        figure(result, image, args.out)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
