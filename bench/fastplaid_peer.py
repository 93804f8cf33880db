"""fast-plaid, the field's compressed multi-vector index (PLAID: centroids + residuals in `nbits`),
as a peer of bench/precision.py's recall table. Run by ANOTHER interpreter, one whose environment
has fast-plaid and the torch it was built for (1.7.0.2110 needs torch 2.11; this project's is
newer), so it imports nothing of the project:

    python -m bench --precision --fast-plaid-python /path/to/env/bin/python

    PYTHON bench/fastplaid_peer.py VECTORS.pt OUT.json   (VECTORS.pt: {"docs": (N, r_c, D), "queries":
                   (N_q, r_q, D), "k": 10, "nbits": [2, 4], "probes": [[8, 4096], [64, 8192]]})
writes, per nbits and search setting: the top-k ids per query, ms per query, build seconds and the
index's bytes on disk.
"""
import json
import os
import sys
import tempfile
import time

import torch
from fast_plaid import search

if __name__ == "__main__":
    inp, out = sys.argv[1], sys.argv[2]
    x = torch.load(inp)
    docs, queries, k = x["docs"], x["queries"], x["k"]
    results = {"torch": torch.__version__, "runs": []}
    for nbits in x["nbits"]:
        with tempfile.TemporaryDirectory() as d:
            index = search.FastPlaid(index=d, device="cpu")
            t = time.perf_counter()
            index.create(documents_embeddings=list(docs), nbits=nbits)
            build = time.perf_counter() - t
            size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
            index.search(queries_embeddings=queries[:1], top_k=k, show_progress=False)    # warm
            for probe, full in x["probes"]:         # its defaults (8 centroids, 4096 rescored), then wider
                t = time.perf_counter()
                hits = index.search(queries_embeddings=queries, top_k=k, n_ivf_probe=probe, n_full_scores=full,
                                    show_progress=False)
                ms = 1e3 * (time.perf_counter() - t) / len(queries)
                results["runs"].append({"nbits": nbits, "n_ivf_probe": probe, "n_full_scores": full,
                                        "ids": [[i for i, _ in h] for h in hits], "ms_per_query": ms,
                                        "build_seconds": build, "index_bytes": size})
    json.dump(results, open(out, "w"))
