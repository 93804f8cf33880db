"""
The benchmarks, one module per concern, run as `python -m bench [MODE]`:

    python -m bench                  # MaxSim speed (bench/speed.py): CPU shapes S1-S4 and a budget sweep; a GPU suite on CUDA
    python -m bench --quick          # fewer repeats
    python -m bench --dispatch       # the CPU dispatch measured afresh; --layout: the grouped on-disk layout
    python -m bench --rehearse qwen2-vl-2b   # memory (bench/memory.py): a full-size backbone with random weights
    python -m bench --memory-table   # the official recipe's memory per device, by arithmetic
    python -m bench --precision      # bf16 math, int8 and 1-bit indexes (bench/precision.py): S1-S6, recall@10
    python -m bench --cascade INDEX  # latency (bench/latency.py): the cascade's recall; --serve: the server's latency
    python -m bench --scale          # the cost of growing (bench/scale.py): 10k-1M candidates, ours and Qdrant's engine
    python -m bench --index-memory   # search.py index and push: peak RSS at two sizes 10x apart
    python -m bench.showcase         # the multi-seed Matryoshka claim (bench/showcase.py)

Speed rows: milliseconds (median), GB/s of candidate data read, GFLOP/s, % of the limit
max(FLOPs / peak FLOP/s, bytes / peak bandwidth), peak extra memory, and speed-up over naive
(colpali-engine's one einsum); every method's output is checked against the reference before it is
timed; installed peers (maxsim-cpu) are timed too, where their output is right.
"""
import argparse

import torch

from bench import latency, memory, precision, scale, speed

MODES = {"rehearse": memory.mode_rehearse, "serve": latency.mode_serve, "dispatch": speed.mode_dispatch,
         "layout": speed.mode_layout, "cascade": latency.mode_cascade, "grad_cache_one": memory.mode_grad_cache_one,
         "grad_cache": memory.mode_grad_cache, "eval_memory": memory.mode_eval_memory,
         "precision": precision.mode_precision, "precision_study": precision.mode_precision_study,
         "scale": scale.mode_scale, "index_memory": scale.mode_index_memory}


def main():
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--json", help="write all rows here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval-memory", type=int, metavar="N",
                   help="instead: peak host memory of evaluating N candidates at (16, 64), D = 3584 (stub "
                   "encoder), against the bf16 index's size")
    p.add_argument("--index-dir", help="with --eval-memory: put the index on disk in this folder")
    p.add_argument("--grad-cache", type=int, metavar="B", help="instead: peak host memory of one training step at "
                   "batch B, plain and with GradCache chunks (--chunks), each in a fresh process")
    p.add_argument("--chunks", default="4,16", help="with --grad-cache: the chunk sizes to measure (default 4,16)")
    p.add_argument("--grad-cache-one", nargs=2, type=int, help=argparse.SUPPRESS)   # B chunk, in a child process
    p.add_argument("--layout", action="store_true", help="instead: 32 x 10k at (1, 1), D = 1536, from search.py's "
                   "grouped layout against prefix views of full embeddings")
    p.add_argument("--cascade", nargs="+", metavar="INDEX", help="instead: the cascade's recall on search.py "
                   "indexes of the synthetic scenes, and its speed on random ones (--random)")
    p.add_argument("--random", nargs="*", default=[], metavar="NxD", help="with --cascade: random indexes to time "
                   "(e.g. 20000x1536)")
    p.add_argument("--plot", help="with --cascade or --precision-study: write the plot here")
    p.add_argument("--rehearse", choices=sorted(memory.REHEARSAL_CONFIGS), help="instead: a full-size backbone with random "
                   "weights on this CPU (bf16): encode a 2000x3000 page, one LoRA training step (memory kept per row, "
                   "forward and backward peaks), save and reload")
    p.add_argument("--memory-table", nargs="*", metavar="JSON", help="instead: the official recipe's per-device "
                   "memory (batch 48, 1,024 visual tokens, checkpointing, bf16) for 2B / 3B / 7B / 32B, by arithmetic "
                   "from rehearsal results (default: docs/rehearse-*.json)")
    p.add_argument("--serve", action="store_true", help="instead: search.py serve's request latency (p50, p95) on "
                   "20,000 random candidates at D = 1536, against the same search in-process")
    p.add_argument("--precision", action="store_true", help="instead: a bf16 index at S1-S6 (maxsim's default, "
                   "exact float32 math, the plain bf16 and float32 torch loops) against the measured bf16 GEMM peak "
                   "and each shape's limit (its FLOPs at that peak or its bytes at the measured read bandwidth); "
                   "recall@10 of bf16 / int8 / binary on random D = 1536 vectors, alone and rescored, beside numkong "
                   "and fast-plaid")
    p.add_argument("--fast-plaid-python", metavar="PYTHON", help="with --precision: an interpreter whose environment "
                   "has fast-plaid and the torch it was built for (it runs bench/fastplaid_peer.py on the same vectors)")
    p.add_argument("--precision-study", metavar="CHECKPOINT", help="instead: P@1 on the synthetic eval at every "
                   "(budget x precision) of a trained checkpoint (a D = 128 one: python train.py --proj-dim 128 --out "
                   "out/tiny-d128), beside bytes per candidate; --plot: quality against bytes, one line per precision")
    p.add_argument("--dispatch", action="store_true", help="instead: measure the CPU dispatch afresh for every "
                   "regime, print the timings and the winners, and keep them (as maxsim's auto path does)")
    p.add_argument("--scale", action="store_true", help="instead: one query's latency, recall@10, build time, peak RSS "
                   "and disk at N = 10k, 100k, 1M (--quick: 10k) for our exhaustive search and cascade and Qdrant's engine "
                   "(HNSW prefetch then MaxSim rerank; int8, binary), D = 128, a stub encoder; --plot: p50 against N")
    p.add_argument("--index-memory", action="store_true", help="instead: peak RSS of search.py index (--texts, the "
                   "tiny model at D = 128) and push (the engine) at N = 1,000 and 10,000 (--sizes), each in a fresh process")
    p.add_argument("--sizes", help="with --scale or --index-memory: the N to measure, e.g. 10000,100000")
    p.add_argument("--scale-dir", help="with --scale: where the indexes and shards are built (default: a temporary folder)")
    args = p.parse_args()
    if args.memory_table is not None:
        return memory.mode_memory_table(args)
    for name in ("rehearse", "serve", "dispatch", "layout", "cascade", "grad_cache_one", "grad_cache", "eval_memory",
                 "precision", "precision_study", "scale", "index_memory"):
        if getattr(args, name):
            return MODES[name](args)
    return speed.mode_speed(args)


if __name__ == "__main__":
    main()
