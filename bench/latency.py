"""Search latency: the cascade's recall and speed-up, and search.py serve's request latency."""
import time

import torch

from bench.common import cpu_name, random_index, unit_vectors, write_json
from metaembed import GROUPS



def cascade_bench(index_path=None, random_size=None, queries=300, depths=(100, 300, 1000), k=10):
    """The cascade (1x1 over everything, 16x64 on the best `depth`) against exhaustive 16x64:
    recall@k of the exhaustive top-k on an index of the synthetic scenes (caption queries, the
    offline model), or the time per query (one at a time, as served) on random vectors."""
    import tempfile

    import search
    from apps import search_index
    tmp = None
    if random_size:
        N, D = random_size
        tmp = tempfile.TemporaryDirectory()
        index = random_index(tmp.name, N, D)
        q = unit_vectors(queries, 16, D, torch.device("cpu"), torch.float32, 99)
    else:
        index = search_index.Index(index_path)
        model = search.load_model(index.meta["checkpoint"])
        q = model.encode_queries([it["source"] for it in index.items if "v" not in it["id"]][:queries])
    t = time.perf_counter()
    exact = torch.cat([index.search(q[a:a + 1], (16, 64), k)[1] for a in range(len(q))])
    t_exact = (time.perf_counter() - t) / len(q)
    rows = [dict(depth="exhaustive", recall=1.0, ms_per_query=1e3 * t_exact, speedup=1.0)]
    for depth in depths:
        t = time.perf_counter()
        got = torch.cat([index.search(q[a:a + 1], (16, 64), k, first=(1, 1), depth=depth)[1] for a in range(len(q))])
        dt = (time.perf_counter() - t) / len(q)
        rec = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, exact)) / exact.numel()
        rows.append(dict(depth=depth, recall=rec, ms_per_query=1e3 * dt, speedup=t_exact / dt))
    if tmp:
        tmp.cleanup()
    return dict(candidates=index.N, dim=index.D, queries=len(q), k=k, random=bool(random_size), rows=rows)


def serve_bench(N=20_000, D=1536, requests=30, k=10):
    """search.py serve's latency: p50 / p95 of whole HTTP search requests (encode + search + JSON)
    on N random candidates at D, against the same search in-process (what `search.py query`
    times), at 1x1, 8x16, 16x64 and the cascade 1x1 -> 16x64 at depth 300."""
    import tempfile
    import threading
    import urllib.request

    from apps import serve
    from metaembed import MetaEmbed
    model = MetaEmbed.from_backbone("tiny", proj_dim=D)            # a query encoder of the index's D
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        index = random_index(tmp, N, D)
        index.meta.update(model_groups=GROUPS, checkpoint="(random vectors)")
        server = serve.make_server(serve.Searcher(index, model), "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/api/search?q=red+top+left&k={k}"
        for name, budget, first in (("1x1", (1, 1), None), ("8x16", (8, 16), None), ("16x64", (16, 64), None),
                                    ("cascade 1x1 -> 16x64, depth 300", (16, 64), (1, 1))):
            query = f"&budget={budget[0]}x{budget[1]}" + (f"&first={first[0]}x{first[1]}&depth=300" if first else "")
            http, cli = [], []
            for _ in range(requests + 2):                          # the first two warm up
                t = time.perf_counter()
                urllib.request.urlopen(url + query, timeout=120).read()
                http.append(time.perf_counter() - t)
                t = time.perf_counter()
                q = model.encode_queries(["red top left"])
                index.search(q, budget, k, first, 300)
                cli.append(time.perf_counter() - t)
            http, cli = sorted(http[2:]), sorted(cli[2:])
            rows.append(dict(search=name, http_p50_ms=1e3 * http[len(http) // 2], http_p95_ms=1e3 * http[int(0.95 * len(http))],
                             in_process_p50_ms=1e3 * cli[len(cli) // 2]))
        server.shutdown()
    return dict(candidates=N, dim=D, requests=requests, k=k, rows=rows)


def cascade_plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        pts = r["rows"][1:]
        label = f"{r['candidates']} x D={r['dim']}" + (" (random)" if r["random"] else " (offline model)")
        ax = axes[1] if r["random"] else axes[0]
        if r["random"]:
            ax.plot([p["depth"] for p in pts], [p["speedup"] for p in pts], marker="o", label=label)
        else:
            ax.plot([p["depth"] for p in pts], [100 * p["recall"] for p in pts], marker="o", label=label)
    axes[0].set_ylabel(f"recall@{results[0]['k']} of exhaustive 16x64 (%)")
    axes[1].set_ylabel("speed-up over exhaustive 16x64 (one query)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("cascade depth (re-scored at 16x64 after 1x1)")
        ax.legend(fontsize=8)
    fig.suptitle("cascade 1x1 -> 16x64")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mode_serve(args):
    """search.py serve's latency."""
    r = serve_bench()
    print(f"CPU {cpu_name()}, {torch.get_num_threads()} threads; search.py serve, {r['candidates']} random "
          f"candidates x D={r['dim']}, k={r['k']}, {r['requests']} requests each, one at a time:")
    for row in r["rows"]:
        print(f"  {row['search']:<34} HTTP p50 {row['http_p50_ms']:7.1f} ms  p95 {row['http_p95_ms']:7.1f} ms   "
              f"in-process p50 {row['in_process_p50_ms']:7.1f} ms")
    write_json(args.json, {**r, "device": cpu_name()})


def mode_cascade(args):
    """the cascade's recall and speed."""
    results = [cascade_bench(path) for path in args.cascade]
    results += [cascade_bench(random_size=tuple(int(x) for x in s.split("x")), queries=20) for s in args.random]
    print(f"CPU {cpu_name()}, {torch.get_num_threads()} threads")
    for r in results:
        print(f"cascade 1x1 -> 16x64, {r['candidates']} candidates x D={r['dim']}"
              f"{' (random: speed only)' if r['random'] else ''}, {r['queries']} queries one at a time, top-{r['k']}:")
        for row in r["rows"]:
            print(f"  depth {str(row['depth']):>10}: recall@{r['k']} {100 * row['recall']:5.1f}%  "
                  f"{row['ms_per_query']:7.2f} ms a query  {row['speedup']:5.1f}x")
    if args.plot:
        cascade_plot(results, args.plot)
    write_json(args.json, results)
