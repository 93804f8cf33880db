"""
The offline showcase: what Matryoshka multi-vector training buys, over several seeds.

For each seed, trains the default offline model (python train.py) and the ablation
(--no-matryoshka: only the full group (16, 64) is trained), evaluates both at every budget on
the synthetic eval split, and prints mean and spread (min..max) of Precision@1 per budget, then
draws quality and index bytes per candidate against the budget.

    python -m bench.showcase --seeds 0 1 --jobs 2        # about 26 minutes on 2 CPU cores (4 runs)
    python -m bench.showcase --steps 200 --seeds 0       # a quick look

Extra arguments after -- go to train.py (e.g. -- --proj-dim 8).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(variant, seed, args, extra):
    out = os.path.join(args.out, f"{variant}-seed{seed}")
    flags = ["--no-matryoshka"] if variant == "no-matryoshka" else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t = time.time()
    cmd = [sys.executable, "train.py", "--seed", str(seed), "--out", out, "--no-progress", "--overwrite",
           "--log-file", out + ".jsonl", *flags, *extra] + (["--steps", str(args.steps)] if args.steps else [])
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    train_s = time.time() - t
    subprocess.run([sys.executable, "evaluate.py", "--checkpoint", out, "--budgets", args.budgets,
                    "--output", out + ".json"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    with open(out + ".json") as f:
        res = json.load(f)
    res["train_seconds"], res["total_seconds"] = train_s, time.time() - t
    print(f"  {variant} seed {seed}: trained in {train_s:.0f}s, total {res['total_seconds']:.0f}s", flush=True)
    return variant, seed, res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, help="training steps (default: train.py's)")
    p.add_argument("--budgets", default="1,4,8,16,64")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", default="out/showcase")
    p.add_argument("--plot", default="docs/showcase.png")
    p.add_argument("--json", default="docs/showcase.json")
    args, extra = p.parse_known_args()
    extra = [x for x in extra if x != "--"]
    os.makedirs(args.out, exist_ok=True)
    runs = [(v, s) for s in args.seeds for v in ("matryoshka", "no-matryoshka")]
    print(f"{len(runs)} runs, {args.jobs} at a time, {args.threads} thread(s) each")
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda r: run_one(*r, args, extra), runs))
    budgets = results[0][2]["budgets"]
    table = {}
    for variant in ("matryoshka", "no-matryoshka"):
        for b in budgets:
            vals = [100 * r["summary"][b]["overall"] for v, _, r in results if v == variant]
            table.setdefault(variant, {})[b] = dict(mean=sum(vals) / len(vals), min=min(vals), max=max(vals),
                                                    runs=vals)
    bytes_per = {b: results[0][2]["summary"][b]["bytes_per_candidate"] for b in budgets}
    print(f"\nsynthetic eval, overall P@1 (%) (mean of t2i and i2t), mean [min..max] over seeds {args.seeds}")
    print(f"{'budget':>7} {'bytes/cand':>10} {'Matryoshka':>22} {'no-Matryoshka':>22}")
    for b in budgets:
        cells = [f"{t[b]['mean']:5.1f} [{t[b]['min']:4.1f}..{t[b]['max']:4.1f}]"
                 for t in (table["matryoshka"], table["no-matryoshka"])]
        print(f"{b:>7} {bytes_per[b]:>10} {cells[0]:>22} {cells[1]:>22}")
    m = table["matryoshka"]
    print(f"rise from {budgets[0]} to {budgets[-1]}: {m[budgets[-1]]['mean'] - m[budgets[0]]['mean']:+.1f} points; "
          f"Matryoshka - no-Matryoshka at {budgets[0]}: "
          f"{m[budgets[0]]['mean'] - table['no-matryoshka'][budgets[0]]['mean']:+.1f} points")
    secs = [r["total_seconds"] for _, _, r in results]
    print(f"train + evaluate per run: {min(secs):.0f}-{max(secs):.0f}s")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"seeds": args.seeds, "extra_train_args": extra, "table": table, "bytes_per_candidate": bytes_per,
                       "seconds": secs}, f, indent=2)
    if args.plot:
        plot(table, bytes_per, budgets, args.plot, results[0][2].get("index_dtype", "bfloat16"))
        print(f"wrote {args.plot}")


def plot(table, bytes_per, budgets, path, dtype="bfloat16"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = list(range(len(budgets)))
    for variant, colour in (("matryoshka", "C0"), ("no-matryoshka", "C3")):
        t = table[variant]
        mean = [t[b]["mean"] for b in budgets]
        lo = [t[b]["mean"] - t[b]["min"] for b in budgets]
        hi = [t[b]["max"] - t[b]["mean"] for b in budgets]
        axes[0].errorbar(x, mean, yerr=[lo, hi], marker="o", capsize=3, color=colour, label=variant)
    axes[0].set_xticks(x, budgets)
    axes[0].set_xlabel("budget r_q x r_c")
    axes[0].set_ylabel("P@1 (%), synthetic eval")
    axes[0].set_ylim(0, 100)
    axes[0].legend()
    axes[1].bar(x, [bytes_per[b] for b in budgets], color="gray")
    axes[1].set_xticks(x, budgets)
    axes[1].set_yscale("log", base=2)
    axes[1].set_xlabel("budget r_q x r_c")
    axes[1].set_ylabel(f"index bytes per candidate ({dtype})")
    fig.suptitle("MetaEmbed, tiny Qwen2-VL on synthetic scenes: one model, every budget (min..max over seeds)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
