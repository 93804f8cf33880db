"""
Search a corpus with MetaEmbed at any budget: encode it once, then choose per query how many
vectors to spend, exhaustively or as a cascade (cheap budget over everything, fine budget on the
best few), on this machine or on Qdrant when the corpus outgrows it.

    python search.py index --checkpoint out/tiny-synthetic --out index/scenes      # the synthetic scenes
    python search.py query --index index/scenes "red top left, blue center" --budget 2x4 -k 5
    python search.py index --checkpoint CK --out INDEX --images DIR     # or --texts FILE.jsonl, --pdf FILE_OR_DIR
    python search.py query --index INDEX "a query" --first 1x1 --depth 1000 --budget 16x64
    python search.py index ... --qdrant PATH_OR_URL     # also into Qdrant (local folder, or a server's URL)
    python search.py query --index INDEX --qdrant PATH_OR_URL "a query" --first 1x1 --depth 1000 --budget 8x16

The index, its cascade and Qdrant are apps/search_index.py; the server and page apps/serve.py.
"""
import argparse
import errno
import json
import os
import sys
import time

from apps.search_index import (OVERSAMPLING, Index, build_index, check_collection, check_depth, list_items,
                                non_finite_items, plan,
                                qdrant_client, qdrant_search, to_qdrant, verify)
from machinery import checks
from machinery.precision import Precision, of_index
from machinery.precision import argument as precision_arg
from machinery.checkpoints import DEFAULT_CHECKPOINT, fingerprint
from metaembed import load_model as load_model_at


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("index", help="encode a corpus into an index folder")
    i.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a checkpoint or train.py --out folder "
                   "(default: the offline run's)")
    i.add_argument("--out", required=True, help="the index folder")
    src = i.add_mutually_exclusive_group()
    src.add_argument("--images", help="a folder of images (searched recursively, symlinked folders followed)")
    src.add_argument("--texts", help="a JSONL file, one {\"id\": ..., \"text\": ...} a line")
    src.add_argument("--pdf", help="a PDF, or a folder of PDFs: one item per page")
    i.add_argument("--synthetic-scenes", type=int, default=300, help="with no corpus given: this many synthetic "
                   "eval scenes (and 3 variants of each)")
    i.add_argument("--batch-size", type=int, default=32)
    i.add_argument("--precision", type=precision_arg, choices=list(Precision), metavar="{" + ",".join(Precision) + "}",
                   help="how a stored number is held (machinery/precision.py; bf16 = bfloat16): a float dtype (default: "
                   "bfloat16, float32 under 128 dimensions), int8 (a scale a vector: about half of bfloat16's bytes) "
                   "or binary (sign bits and a scale: about a 16th); int8 / binary keep the float copy beside them "
                   "for a cascade's rescoring (--first)")
    i.add_argument("--keep-float", default="all", metavar="{all,none,R_C}",
                   help="with --precision int8 / binary: how much of the float copy to keep: all (default), none (a "
                   "cascade rescores from the low bits), or a stored r_c (e.g. 16: the float copy of vectors 1-16, what "
                   "a cascade rescoring at 8x16 reads; past it, the low bits). See docs/search.md")
    i.add_argument("--qdrant", help="also write the index into Qdrant: a local folder (Qdrant's engine in-process, "
                   "qdrant-edge), or a server's http(s) URL")
    i.add_argument("--collection", default="metaembed", help="the Qdrant collection (default metaembed)")
    i.add_argument("--overwrite", action="store_true", help="with --qdrant: replace a collection of another index")
    q = sub.add_parser("query", help="search an index")
    q.add_argument("text", nargs="?", default="", help="the query text")
    q.add_argument("--index", required=True, help="an index folder written by `search.py index`")
    q.add_argument("--checkpoint", help="the checkpoint the index was built with, if it has moved (default: the "
                   "one index.json names; its contents must match the index's fingerprint)")
    q.add_argument("--image", help="a query image (with or without text)")
    q.add_argument("--budget", default="16x64", help="r_q x r_c (or a number: the group with that r_c; default 16x64)")
    q.add_argument("--first", help="cascade: score everything at this cheaper budget first (e.g. 1x1)")
    q.add_argument("--depth", type=int, help="with --first: re-score the best N (default 1000; at least -k; with "
                   "--qdrant --first 1x1: the N nearest by the first vector, from Qdrant's HNSW)")
    q.add_argument("-k", type=int, default=10, help="results to print")
    q.add_argument("--json", action="store_true", help="print the results as JSON")
    q.add_argument("--qdrant", help="search Qdrant instead (a local folder or a URL) with the index's model")
    q.add_argument("--collection", default="metaembed")
    w = sub.add_parser("serve", help="a local search page over an index (the budget as a slider)")
    w.add_argument("--index", default="index/scenes", help="an index folder (default index/scenes: build it with "
                   "`python search.py index --out index/scenes`, the synthetic scenes)")
    w.add_argument("--checkpoint", help="the checkpoint the index was built with, if it has moved")
    w.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=int, default=8765)
    v = sub.add_parser("verify", help="check an index's files against their checksums, and its vectors for NaN / inf")
    v.add_argument("index", help="an index folder")
    u = sub.add_parser("push", help="upload an index into Qdrant, or complete an upload cut short")
    u.add_argument("--index", required=True)
    u.add_argument("--qdrant", required=True, help="a local folder, or a server's http(s) URL")
    u.add_argument("--collection", default="metaembed")
    u.add_argument("--overwrite", action="store_true", help="replace a collection of another index")
    args = p.parse_args(argv)
    for k in ("batch_size", "synthetic_scenes", "depth", "k"):
        if getattr(args, k, None) is not None and getattr(args, k) < 1:
            p.error(f"{'-k' if k == 'k' else '--' + k.replace('_', '-')} must be at least 1")
    if args.command == "query":
        if "," in args.budget or (args.first and "," in args.first):
            p.error("--budget and --first take one budget each (e.g. --budget 2x4), not a list")
        try:
            check_depth(args.first, args.depth)
        except ValueError as e:
            p.error(str(e))
    if args.command == "index":
        checks.writable_dir(p.error, "--out", args.out)
    return args


def load_model(path):
    model, found = load_model_at(path, "search.py")
    model.source, model.fingerprint = os.path.abspath(found), fingerprint(found)
    return model


def index_cmd(args):
    model = load_model(args.checkpoint)
    if args.qdrant:      # client problems (and a shard held open elsewhere) are found now, not after encoding
        store = qdrant_client(args.qdrant)
        try:
            store.exists(args.collection)
        finally:
            store.close()
    args.max_pixels = model.config.max_pixels or model.processor.image_processor.size["longest_edge"]
    items, unreadable = list_items(args, model)
    t = time.time()
    try:
        skipped = build_index(model, items, args.out, args.batch_size, precision=args.precision,
                              keep_float=args.keep_float)
    except OSError as e:          # a full disk, a folder made read-only: said, and a rerun continues
        raise ValueError(f"writing the index into {args.out} failed ({e.strerror or e}"
                         f"{': the disk is full' if e.errno == errno.ENOSPC else ''}): make room and run the same "
                         f"command again, it continues from the last finished shard") from None
    index = Index(args.out)
    low = [f for f, _ in index.vectors.file_sizes() if f not in index.vectors.files]
    print(f"indexed {index.N - len(skipped)} items in {time.time() - t:.1f}s into {args.out} "
          f"({sum(os.path.getsize(f) for f in index.vectors.files) / 2**20:.1f} MiB {index.meta['dtype']}"
          + ("" if index.vectors.float_r_c == index.R_c else " (no float copy)" if index.vectors.float_r_c == 0
             else f" (the float copy of vectors 1-{index.vectors.float_r_c} only)")
          + (f" + {sum(os.path.getsize(f) for f in low) / 2**20:.1f} MiB {index.precision}, searched" if low else "")
          + f"; budgets r_c {', '.join(str(b) for _, b in index.bounds)})")
    for r in unreadable:
        print(f"skipped {r['source']}: {r['error']}")
    for r in skipped:
        print(f"skipped item {r['item']} ({r['source']}): {r['error']}")
    if args.qdrant:
        push(index, args.qdrant, args.collection, args.overwrite)


def push(index, where, collection, overwrite):
    bad = non_finite_items(index)              # Qdrant refuses them: said before a collection is made
    if bad:
        raise ValueError(f"index {index.path}: {bad}: nothing pushed; run `search.py verify {index.path}`, then "
                         f"rebuild the index")
    store = qdrant_client(where, collection, index.meta, overwrite)
    try:
        to_qdrant(index, store, collection, overwrite=overwrite)
        check_collection(store, index, collection)
    finally:
        store.close()
    how = "Qdrant's engine in-process" if not store.server else "Qdrant"
    quant = f", {index.precision} quantization (searches rescore, oversampling {OVERSAMPLING:g})" \
        if index.vectors.quantized else ""
    print(f"wrote {index.N - len(index.skipped)} points to {how} at {where}, collection {collection}{quant}")


def open_index(path):
    if not os.path.isfile(os.path.join(path, "index.json")) and not os.path.exists(path):
        raise FileNotFoundError(f"no index at {path}: build one with `python search.py index --out {path}` "
                                f"(the synthetic scenes; --images, --texts or --pdf for your own corpus)")
    return Index(path)


def open_for_search(args, index=None):
    """The index and its model, the model checked against the index's fingerprint."""
    index = index or open_index(args.index)
    model = load_model(args.checkpoint or index.checkpoint)
    if model.fingerprint != index.meta.get("fingerprint"):
        raise ValueError(f"the checkpoint {model.source} is not the one {args.index} was built with (fingerprint "
                         f"{model.fingerprint}, the index's {index.meta.get('fingerprint')}): rebuild the index with "
                         f"`search.py index --checkpoint {model.source} --out ...`, or pass --checkpoint the one it was "
                         f"built with")
    return index, model


def query_cmd(args):
    index = open_index(args.index)
    budget, first, depth = plan(index.meta, args.budget, args.first, args.depth, args.k)    # before the model loads
    if not args.text and not args.image:
        raise ValueError("a query needs a text or an --image (or both)")
    index, model = open_for_search(args, index)
    t = time.time()
    q = model.encode_queries([args.text], [args.image] if args.image else None)       # (1, R_q, D)
    t_enc, t = time.time() - t, time.time()
    if args.qdrant:
        store = qdrant_client(args.qdrant)
        try:
            check_collection(store, index, args.collection)
            hits = qdrant_search(store, q[0].numpy(), budget, args.k, first, depth if first else None, args.collection,
                                 precision=index.precision)
        finally:
            store.close()
    else:
        s, i = index.search(q, budget, args.k, first, depth)          # METAEMBED_MAXSIM: read by maxsim
        hits = list(zip(s[0].tolist(), i[0].tolist()))
    t_search = time.time() - t
    results = [{"rank": r + 1, "score": s, **index.items[j]} for r, (s, j) in enumerate(hits)]
    if args.json:
        print(json.dumps({"query": args.text, "image": args.image, "budget": str(budget),
                          "first": str(first) if first else None, "precision": index.precision,
                          "results": results,
                          "encode_ms": 1e3 * t_enc, "search_ms": 1e3 * t_search}, indent=2))
        return results
    how = f"{first} over {index.N}, then {budget} on the best {min(depth, index.N)}" if first else \
        f"{budget} over {index.N}"
    if index.vectors.quantized and args.qdrant:     # Qdrant's quantization, always rescored
        how += f" ({index.precision} quantization, rescored with the originals, oversampling {OVERSAMPLING:g})"
    elif index.vectors.quantized:        # the low bits searched; a cascade rescores from the float copy
        rescored = index.meta["dtype"] if budget[1] <= index.vectors.float_r_c else f"{index.precision} (no float copy)"
        how += f" ({index.precision}" + (f", rescored in {rescored})" if first else ")")
    print(f"{how}{' (Qdrant)' if args.qdrant else ''}: encoded in {1e3 * t_enc:.0f} ms, "
          f"searched in {1e3 * t_search:.1f} ms")
    for r in results:            # one line a result: a newline (or any control character) in a name is escaped
        print(f"{r['rank']:>3}  {r['score']:8.4f}  {printable(r['id'])}  {printable(r['source'])}")
    return results


def printable(text):
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def main(argv=None):
    args = get_args(argv)
    try:
        if args.command == "verify":
            problems = verify(args.index)
            for line in problems:
                print(f"{args.index}: {line}")
            if problems:
                sys.exit(f"search.py: {args.index} failed verification ({len(problems)} problem(s))")
            meta = json.load(open(os.path.join(args.index, "index.json")))
            print(f"{args.index}: ok (sizes, items, checksums, every value finite; precision {of_index(meta)})")
            if "meta_sha256" not in meta:      # an index built before index.json carried its own checksum
                print(f"{args.index}: note: index.json and items.jsonl carry no checksum (built before they were "
                      f"written): they were checked field by field only; rebuild the index to cover them")
            return []
        if args.command == "serve":
            from apps import serve
            server = serve.make_server(None, args.host, args.port)     # a bad --host / --port: said before loading
            try:
                index, model = open_for_search(args)
            except BaseException:
                server.server_close()
                raise
            return serve.run(serve.Searcher(index, model), args.host, args.port, server)
        if args.command == "push":
            return push(Index(args.index), args.qdrant, args.collection, args.overwrite)
        return index_cmd(args) if args.command == "index" else query_cmd(args)
    except KeyboardInterrupt:
        sys.exit("search.py: interrupted" + (f"; run the same command again to continue {args.out}"
                                              if args.command == "index" else ""))
    except (ValueError, FileNotFoundError, ImportError, PermissionError) as e:
        sys.exit(f"search.py: error: {e}")


if __name__ == "__main__":
    main()
