"""evaluate.py's report: the summary per budget, the results table and the quality-against-budget
plot (matplotlib, imported only there)."""
from machinery import index

SUMMARY_FIELDS = ("overall", "bytes_per_candidate", "index_bytes", "score_seconds", "flops_per_pair")


def summarise(results, budgets, headline, D, itemsize, n_candidates, task_groups=None):
    """Per budget: the mean headline metric over tasks (and over each of task_groups' subsets that
    ran: MMEB's meta-tasks, IND, OOD), bytes per candidate and index size in the index's precision,
    scoring time summed over tasks."""
    out, tasks = {}, results["tasks"]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    low = results.get("precision") in index.QUANTIZED
    vector = index.vector_bytes(D, results["precision"]) if low else D * itemsize     # bytes a stored vector
    for rq, rc in budgets:
        key = f"{rq}x{rc}"
        vals = {t: r[key][headline] for t, r in tasks.items()}
        row = {"overall": mean(vals.values()), "bytes_per_candidate": rc * vector,
               "index_bytes": rc * vector * n_candidates,
               "score_seconds": sum(r[key]["score_seconds"] for r in tasks.values()), "flops_per_pair": 2 * rq * rc * D}
        row.update({name: mean([vals[s] for s in subsets if s in vals]) for name, subsets in (task_groups or {}).items()
                    if any(s in vals for s in subsets)})
        out[key] = row
    return out


def print_table(results, file=None):
    h, budgets, tasks, summary = results["headline"], results["budgets"], list(results["tasks"]), results["summary"]
    extra = [k for k in summary[budgets[0]] if k not in SUMMARY_FIELDS]          # the task groups, in order
    cols = ["budget", *tasks, *extra, "overall", "bytes/cand", "score ms"]
    rows = [[b, *(f"{100 * results['tasks'][t][b][h]:.1f}" for t in tasks), *(f"{100 * summary[b][k]:.1f}" for k in extra),
             f"{100 * summary[b]['overall']:.1f}", str(summary[b]["bytes_per_candidate"]),
             f"{1000 * summary[b]['score_seconds']:.1f}"] for b in budgets]
    print(f"\n{results['benchmark']} | {results['model']} | {h} (%) by budget r_q x r_c, D={results['dim']}", file=file)
    for row in [cols, *rows]:
        print("  ".join(c.rjust(max(8, len(col))) for c, col in zip(row, cols)), file=file)
    enc, dt = sum(t["encode_seconds"] for t in results["tasks"].values()), results["index_dtype"]
    if results.get("precision") in index.QUANTIZED:
        per = index.vector_bytes(results["dim"], results["precision"])
        print(f"encoded once in {enc:.1f}s; bytes/cand = r_c x {per} ({results['precision']} index: codes and a "
              f"float32 scale a vector)", file=file)
    else:
        print(f"encoded once in {enc:.1f}s; bytes/cand = r_c x D x {index.DTYPES[dt].itemsize} ({dt} index)", file=file)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h, budgets, s = results["headline"], results["budgets"], results["summary"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = list(range(len(budgets)))
    for t in results["tasks"]:
        left.plot(x, [100 * results["tasks"][t][b][h] for b in budgets], marker="o", label=t, alpha=0.6)
    left.plot(x, [100 * s[b]["overall"] for b in budgets], marker="o", color="k", lw=2, label="overall")
    left.set(xticks=x, xticklabels=budgets, xlabel="budget r_q x r_c", ylabel=f"{h} (%)")
    left.legend(fontsize=8)
    right.plot([s[b]["bytes_per_candidate"] for b in budgets], [100 * s[b]["overall"] for b in budgets], marker="o", color="k")
    for b in budgets:
        right.annotate(b, (s[b]["bytes_per_candidate"], 100 * s[b]["overall"]), fontsize=8)
    right.set_xscale("log", base=2)
    shown = results["precision"] if results.get("precision") in index.QUANTIZED else results["index_dtype"]
    right.set(xlabel=f"index bytes per candidate ({shown})", ylabel=f"overall {h} (%)")
    fig.suptitle(f"MetaEmbed, {results['benchmark']}: quality against budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
