"""
Train MetaEmbed with the Matryoshka Multi-Vector Retrieval loss.

    python train.py                                   # offline: tiny backbone, synthetic data, CPU
    python train.py --backbone qwen2-vl-2b --data mmeb-train --mmeb-train TIGER-Lab/MMEB-train \\
        --images DIR --subsets ImageNet_1K CIRR        # the real thing, on a GPU
    torchrun --nproc_per_node 8 train.py ...          # many GPUs (DDP; --fsdp to shard the backbone)

Checkpoints: OUT/checkpoint-STEP (the save_pretrained format plus the optimizer state), written to
a temporary folder and renamed; OUT/latest names the newest. --resume continues from it with the
same data order.
"""
import argparse
import functools
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

import data
from metaembed import CHECKPOINT_FILES, GROUPS, MetaEmbed, latest_checkpoint, matryoshka_loss, write_atomic

# defaults per kind of run: the offline tiny one, and the paper's recipe for real backbones
TINY_DEFAULTS = dict(steps=1200, batch_size=32, lr=2e-3, warmup=100, proj_dim=4, out="out/tiny-synthetic")
PAPER_DEFAULTS = dict(steps=4000, batch_size=48, lr=1e-4, warmup=500, proj_dim=None, out=None)
# --recipe paper: what the official 7b_mrl.yaml sets (batch is per device: 48 x GPUs in all)
PAPER_RECIPE = dict(backbone="qwen2.5-vl-7b", mixture=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                    "mixtures", "paper.yaml"), lora=True, lr=1e-4, warmup=500, steps=4000, batch_size=48,
                    num_negatives=1, source_run=32, holdout=100, max_pixels=1024 * 28 * 28, query_suffix=True,
                    grad_checkpointing=True, temperature=0.03, query_tokens=16, candidate_tokens=64, proj_dim=0,
                    out="out/metaembed-paper")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=["paper"], help="paper: every setting of the official 7b_mrl.yaml (the "
                   "mixture, LoRA, lr, warmup, steps, per-device batch, negatives, image cap, prompts); printed; "
                   "flags given explicitly still win")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="tiny", help="tiny (offline), qwen2-vl-2b, qwen2-vl-7b, qwen2.5-vl-3b/"
                   "7b/32b, a hub id or a local folder (default: tiny)")
    g.add_argument("--proj-dim", type=int, default=-1, help="per-vector projection size, 0 = none "
                   "(default: 4 for tiny, none otherwise)")
    g.add_argument("--query-tokens", type=int, default=16, help="R_q (default 16)")
    g.add_argument("--candidate-tokens", type=int, default=64, help="R_c (default 64)")
    g.add_argument("--temperature", type=float, default=0.03)
    g.add_argument("--no-matryoshka", action="store_true",
                   help="ablation: train only the full group (R_q, R_c), no nested prefixes")
    g.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRA r=32 on the backbone (default: on for real backbones, off for tiny)")
    g.add_argument("--lora-vision", action="store_true", help="LoRA on the vision tower too (the official run: "
                   "the language model only)")
    g.add_argument("--grad-checkpointing", action="store_true", help="trade compute for memory")
    g.add_argument("--max-pixels", type=int, help="cap on an image's pixels, so its visual tokens (default: "
                   "1024 tokens = 802816 for real backbones, as the official config; tiny: its own bound)")
    g.add_argument("--min-pixels", type=int, help="floor on an image's pixels (default: the backbone's)")
    g.add_argument("--query-suffix", action=argparse.BooleanOptionalAction, default=None,
                   help="the official query augmentation: <|endoftext|> x 10 after every query's prompt "
                   "(default: on for real backbones, off for tiny)")
    g.add_argument("--attn-implementation", default="sdpa",
                   help="attention kernel of the backbone: sdpa (default), flash_attention_2 (where installed), eager")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", choices=["synthetic", "mmeb-train", "colpali-train"])
    g.add_argument("--mmeb-train", default="TIGER-Lab/MMEB-train", help="hub id or local folder")
    g.add_argument("--colpali-train", default="vidore/colpali_train_set", help="hub id or local folder")
    g.add_argument("--images", help="folder the MMEB-train image paths are relative to")
    g.add_argument("--subsets", nargs="+", help="MMEB-train subsets, e.g. ImageNet_1K CIRR")
    g.add_argument("--max-per-subset", type=int, help="cap on rows per MMEB-train subset")
    g.add_argument("--synthetic-size", type=int, default=20000, help="synthetic training pairs")
    g.add_argument("--objects", default="%d,%d" % data.OBJECTS,
                   help="synthetic squares per scene, min,max (default %(default)s)")
    g.add_argument("--mixture", help="a mixture file (YAML, the official form: Source: {weight, num_samples, path}); "
                   "overrides --data. mixtures/paper.yaml is the paper's")
    g.add_argument("--source-run", type=int, default=32, help="with --mixture: consecutive examples from one "
                   "source (same-task in-batch negatives; official interleaved_batch_size 32)")
    g.add_argument("--holdout", type=int, default=100, help="rows held out per source for --eval-every (the last "
                   "ones of each mixture source; synthetic: this many eval scenes)")
    g.add_argument("--num-negatives", type=int, default=1, help="hard negatives per query, K (rows with fewer "
                   "repeat their last; 0 = in-batch negatives only)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="optimizer steps (default: 1200 tiny, 4000 real)")
    g.add_argument("--batch-size", type=int, help="queries per device per step (default: 32 tiny, 48 real)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 2e-3 tiny, 1e-4 real)")
    g.add_argument("--warmup", type=int, help="linear warmup steps, then linear decay to 0")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    g.add_argument("--grad-cache-chunk", type=int, default=0, metavar="N",
                   help="GradCache: hold activations for only N rows at a time, with the whole batch's loss and "
                   "gradients (a large --batch-size on few GPUs; 0 = off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--fsdp", action="store_true", help="shard the backbone across ranks (FSDP2)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="checkpoint folder (default: out/tiny-synthetic for tiny)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept (older ones removed)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an OUT that holds checkpoints "
                   "(its checkpoints are removed)")
    g.add_argument("--log-file", help="append one JSON object per step (step, loss, lr, loss per group)")
    g.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="every N steps (and at the end): P@1 on held-out rows at each Matryoshka group, logged")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.recipe == "paper":  # the recipe's settings, except those given on the command line
        given = {a.dest for a in p._actions if any(o in (argv if argv is not None else sys.argv[1:])
                                                   for o in a.option_strings)}
        for k, v in PAPER_RECIPE.items():
            if k not in given:
                setattr(args, k, v)
        kept = sorted(given & set(PAPER_RECIPE))
        print("--recipe paper: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in PAPER_RECIPE.items()
                                              if k not in given) + (f" (given: {', '.join(kept)})" if kept else ""))
    d = TINY_DEFAULTS if args.backbone == "tiny" else PAPER_DEFAULTS
    for k in ("steps", "batch_size", "lr", "warmup", "out"):
        if getattr(args, k) is None:
            setattr(args, k, d[k])
    if args.proj_dim < 0:
        args.proj_dim = d["proj_dim"]
    if args.out is None:
        p.error(f"--out is required for backbone {args.backbone!r}")
    if args.data == "mmeb-train" and not args.subsets:
        p.error("--data mmeb-train needs --subsets (e.g. --subsets ImageNet_1K CIRR)")
    # every check that can be made before training starts is made here, not at the first checkpoint
    at_least = dict(steps=1, batch_size=1, save_every=1, keep=1, query_tokens=1, candidate_tokens=1,
                    synthetic_size=1, workers=0, warmup=0, proj_dim=0)
    at_least.update(source_run=1, holdout=1, num_negatives=0, grad_cache_chunk=0, eval_every=0)
    for k, lo in at_least.items():
        if getattr(args, k) is not None and getattr(args, k) < lo:
            p.error(f"--{k.replace('_', '-')} must be at least {lo}, got {getattr(args, k)}")
    for k in ("lr", "temperature", "clip", "max_pixels", "min_pixels", "max_per_subset"):
        v = getattr(args, k)
        if v is not None and not (v > 0 and math.isfinite(v)):
            p.error(f"--{k.replace('_', '-')} must be a positive number, got {v}")
    if args.weight_decay < 0:
        p.error(f"--weight-decay must be at least 0, got {args.weight_decay}")
    try:
        data.parse_objects(args.objects)
    except ValueError as e:
        p.error(f"--{e}")
    return args


# -----------------------------------------------------------------------------
# data order: a function of (seed, step) only, so a resumed run sees the same batches

def batch_indices(step, n, global_batch, seed):
    """Indices of the global batch at `step`: epoch-wise seeded permutations, last partial dropped."""
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"the data has {n} examples, fewer than one global batch of {global_batch}")
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[k * global_batch:(k + 1) * global_batch].tolist()


class StepBatches(torch.utils.data.Sampler):
    def __init__(self, n, batch, world, rank, seed, start, steps):
        self.args = n, batch, world, rank, seed, start, steps

    def __iter__(self):
        n, batch, world, rank, seed, start, steps = self.args
        for step in range(start, steps):
            yield batch_indices(step, n, batch * world, seed)[rank * batch:(rank + 1) * batch]

    def __len__(self):
        return self.args[-1] - self.args[-2]


class MixtureBatches(torch.utils.data.Sampler):
    """This rank's batches of a data.Mixture: B consecutive examples of its own stream per step
    (runs of `run` examples from one source), epoch after epoch; a pure function of the step."""

    def __init__(self, mixture, batch, rank, seed, start, steps, run):
        self.mixture, self.args, self.cached = mixture, (batch, rank, seed, start, steps, run), (None, None)

    def _epoch(self, e):
        if self.cached[0] != e:
            batch, rank, seed, start, steps, run = self.args
            self.cached = (e, self.mixture.epoch(seed, rank, e, run))
        return self.cached[1]

    def batch(self, step):
        B, L = self.args[0], len(self.mixture)
        out = []
        for p in range(step * B, (step + 1) * B):
            src, rows = self._epoch(p // L)
            out.append((int(src[p % L]), int(rows[p % L])))
        return out

    def seen(self, step):
        """Examples of each source this rank has trained on after `step` steps (for the log)."""
        import numpy as np
        end, L = step * self.args[0], len(self.mixture)
        full, off = divmod(end, L)
        sizes = np.array([len(s) for s in self.mixture.sources])
        part = np.bincount(self._epoch(full)[0][:off], minlength=len(sizes)) if off else 0
        return dict(zip(self.mixture.names, (full * sizes + part).tolist()))

    def __iter__(self):
        for step in range(self.args[3], self.args[4]):
            yield self.batch(step)

    def __len__(self):
        return self.args[4] - self.args[3]


def build_data(args, world, rank, start):
    """-> (dataset, batch sampler, held-out retrieval tasks for --eval-every)."""
    if args.mixture:
        mix = data.load_mixture(args.mixture, args.images, args.holdout, args.seed)
        sampler = MixtureBatches(mix, args.batch_size, rank, args.seed, start, args.steps, args.source_run)
        return mix, sampler, {n: heldout_task(s) for n, s in zip(mix.names, mix.heldout)}
    if args.data == "synthetic":
        lo, hi = data.parse_objects(args.objects)
        ds = data.SyntheticPairs(args.synthetic_size, seed=args.seed, min_objects=lo, max_objects=hi)
        heldout = data.synthetic_eval(args.holdout, n_variants=1, seed=args.seed + 1, min_objects=lo, max_objects=hi)
    elif args.data == "mmeb-train":
        ds, heldout = data.load_mmeb_train(args.mmeb_train, args.subsets, args.images, args.max_per_subset), {}
    else:
        ds, heldout = data.load_colpali_train(args.colpali_train), {}
    return ds, StepBatches(len(ds), args.batch_size, world, rank, args.seed, start, args.steps), heldout


def heldout_task(source):
    """Held-out rows -> a retrieval task: each query against all the held-out positives."""
    rows = [source[i] for i in range(len(source))]
    return dict(queries={i: (r["qry_text"], r["qry_image"]) for i, r in enumerate(rows)},
                corpus={i: (r["pos_text"], r["pos_image"]) for i, r in enumerate(rows)},
                qrels={i: {i: 1} for i in range(len(rows))})


# -----------------------------------------------------------------------------
# checkpoints: model (safetensors + json) + optimizer state (safetensors + json), never pickle

def save_checkpoint(out, step, model, opt, args, fsdp=False, master=True):
    """args: a dict of the settings in force (recorded as train_args.json)."""
    """Every rank calls this (FSDP gathers the full state from all); the master writes."""
    from safetensors.torch import save_file
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        # the full state of what is trained (a frozen base is reloaded by name, never gathered)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        model_sd, sd = get_model_state_dict(model, options=full), get_optimizer_state_dict(model, opt, options=full)
    else:
        model_sd, sd = None, opt.state_dict()
    if not master:
        return None
    final = os.path.join(out, f"checkpoint-{step:07d}")
    model.save_pretrained(final, state_dict=model_sd)  # atomic: a temporary folder, then rename
    with open(os.path.join(final, "train_args.json"), "w") as f:
        json.dump(args, f, indent=2)
    tensors = {f"{i}::{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    tensors["rng::cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng::cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, os.path.join(final, "optimizer.safetensors.tmp"))
    os.replace(os.path.join(final, "optimizer.safetensors.tmp"), os.path.join(final, "optimizer.safetensors"))
    # trainer_state.json last: its presence marks a complete checkpoint
    write_atomic(os.path.join(final, "trainer_state.json"), json.dumps({"step": step, "param_groups": sd["param_groups"]}))
    write_atomic(os.path.join(out, "latest"), os.path.basename(final))
    return final


def load_optimizer(path, model, opt, fsdp=False):
    """Restore the optimizer and RNG state of a checkpoint; -> its step."""
    from safetensors.torch import load_file
    with open(os.path.join(path, "trainer_state.json")) as f:
        meta = json.load(f)
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    state = {}
    for key, v in tensors.items():
        if not key.startswith("rng::"):
            i, k = key.split("::", 1)
            state.setdefault(int(i) if i.isdigit() else i, {})[k] = v
    sd = {"state": state, "param_groups": meta["param_groups"]}
    if fsdp:  # keyed by parameter name: each rank takes its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(sd)
    torch.set_rng_state(tensors["rng::cpu"])
    if "rng::cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng::cuda"])
    return meta["step"]


TRAIN_FILES = CHECKPOINT_FILES + ("optimizer.safetensors", "trainer_state.json")  # a resumable checkpoint


def prune_checkpoints(out, keep):
    """Keep the newest `keep` checkpoints up to the one OUT/latest names; never remove that one or
    anything newer (a newer folder is the user's to judge)."""
    with open(os.path.join(out, "latest")) as f:
        latest = f.read().strip()
    older = sorted(d for d in os.listdir(out) if re.fullmatch(r"checkpoint-\d+", d) and d <= latest)
    for d in older[:-keep]:
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)


# Settings a resumed run may change (they decide where and how things run, not what is computed);
# any other must match the checkpoint's train_args.json.
SAFE_TO_CHANGE = {"out", "resume", "overwrite", "save_every", "keep", "log_file", "no_progress", "workers",
                  "grad_checkpointing", "attn_implementation", "fsdp", "images"}


def check_resume(args, path, world):
    """Refuse to resume with settings that change the model, the loss, the optimisation or the data
    order; -> the settings actually in force (the checkpoint's, plus what may change)."""
    with open(os.path.join(path, "train_args.json")) as f:
        saved = json.load(f)
    saved.setdefault("world_size", world)        # checkpoints from before it was recorded
    now = {**vars(args), "world_size": world}
    diff = {k: (saved[k], now[k]) for k in saved if k in now and k not in SAFE_TO_CHANGE and saved[k] != now[k]}
    if diff:
        said = ", ".join(f"{'--' + k.replace('_', '-') if k != 'world_size' else 'processes'} {a!r} -> {b!r}"
                         for k, (a, b) in diff.items())
        raise ValueError(f"--resume from {path} with other settings than it was trained with ({said}): "
                         f"resume with the same ones (only "
                         f"{', '.join(sorted(SAFE_TO_CHANGE - {'resume', 'out', 'overwrite'}))} "
                         f"may change), or train afresh into another --out")
    return {**saved, **{k: now[k] for k in SAFE_TO_CHANGE if k in now}}


# -----------------------------------------------------------------------------

def lr_lambda(warmup, steps):
    """Linear warmup to the peak, then linear decay to 0 at `steps`."""
    return lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))


def gather_with_grad(x):
    """All ranks' x concatenated in rank order; the gradient flows back to each rank's own rows
    (summed over ranks by a reduce-scatter)."""
    if not dist.is_initialized():
        return x
    from torch.distributed._functional_collectives import all_gather_tensor_autograd
    return all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def mmr_loss(cfg, q, c, neg_mask, B, rank):
    """The MMR loss of one local batch's embeddings, in fp32 (and the loss per group). q (B, R_q, D);
    c: B positives, then B * K hard negatives (query-major) if neg_mask (B, K) is given. Positives
    are gathered from every rank with gradient (this rank's at row rank * B); negatives stay local."""
    pos, neg = c[:B], None
    if neg_mask is not None:
        neg = c[B:].view(B, neg_mask.shape[1], *c.shape[1:])              # (B, K, R_c, D)
        neg_mask = neg_mask.to(q.device)
    pos_all = gather_with_grad(pos)                                     # (B * world, R_c, D)
    return matryoshka_loss(q.float(), pos_all.float(), None if neg is None else neg.float(), cfg.groups,
                           cfg.temperature, cfg.group_weights, offset=rank * B, neg_mask=neg_mask,
                           return_groups=True)


def rows_of(inputs, lo, hi, image_token_id):
    """Rows lo:hi of a processor batch, with their images' patches (each row holds at most one
    image, its patches in row order in pixel_values, its grid in image_grid_thw)."""
    out = {k: inputs[k][lo:hi] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    if inputs.get("pixel_values") is not None:
        has = (inputs["input_ids"] == image_token_id).any(1).long().cumsum(0)   # images up to each row
        first, last = (int(has[lo - 1]) if lo else 0), int(has[hi - 1])
        patches = torch.cat([torch.zeros(1, dtype=torch.long), inputs["image_grid_thw"].prod(1).cumsum(0)])
        if last > first:
            out["pixel_values"] = inputs["pixel_values"][patches[first]:patches[last]]
            out["image_grid_thw"] = inputs["image_grid_thw"][first:last]
    return out


def grad_cache_step(net, model, cfg, q_in, c_in, neg_mask, B, rank, chunk, amp, no_sync):
    """GradCache (Gao et al., 2021): the loss of the whole batch, with activations for only `chunk`
    rows at a time. 1) every chunk's embeddings without a graph; 2) the loss on all of them (all
    ranks' positives gathered) and its gradient w.r.t. the embeddings; 3) each chunk again with a
    graph, back-propagated against its slice of that gradient, with the RNG state of its first
    pass (same dropout). Parameter gradients equal the full batch's. -> (loss, per group)."""
    img = model.backbone.config.image_token_id
    parts = [(side, inputs, lo, min(lo + chunk, n)) for side, inputs in (("query", q_in), ("candidate", c_in))
             for n in [inputs["input_ids"].shape[0]] for lo in range(0, n, chunk)]
    states, embs = [], {"query": [], "candidate": []}
    with torch.no_grad():
        for side, inputs, lo, hi in parts:
            states.append(_rng_state())
            with amp:
                e = net(rows_of(inputs, lo, hi, img), None)[0] if side == "query" else \
                    net(None, rows_of(inputs, lo, hi, img))[1]
            embs[side].append(e)
    q = torch.cat(embs["query"]).requires_grad_()                         # (B, R_q, D), a leaf
    c = torch.cat(embs["candidate"]).requires_grad_()                     # (B + B K, R_c, D)
    loss, per_group = mmr_loss(cfg, q, c, neg_mask, B, rank)
    check_finite(loss)
    loss.backward()                                                       # -> q.grad, c.grad
    for k, (side, inputs, lo, hi) in enumerate(parts):
        with torch.random.fork_rng(devices=[q.device] if q.is_cuda else []), \
                (no_sync() if k < len(parts) - 1 else nullcontext()):     # DDP: all-reduce once, at the end
            _set_rng_state(states[k])
            with amp:
                e = net(rows_of(inputs, lo, hi, img), None)[0] if side == "query" else \
                    net(None, rows_of(inputs, lo, hi, img))[1]
            e.backward((q.grad if side == "query" else c.grad)[lo:hi])
    return loss.detach(), per_group.detach()


def _rng_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def _set_rng_state(state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def check_finite(loss):
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"the loss is {loss.item()}: lower --lr or check the data")


@torch.no_grad()
def evaluate_heldout(model, tasks, groups, batch_size, device):
    """P@1 on the held-out rows at each Matryoshka group, averaged over tasks (sources)."""
    from evaluate import score_retrieval
    if not tasks:
        return {}
    out = {f"heldout_p1_{rq}x{rc}": 0.0 for rq, rc in groups}
    for task in tasks.values():
        res, _ = score_retrieval(model, task, list(groups), batch_size, device, k=1, dtype=torch.float32,
                                 progress=False)
        for rq, rc in groups:
            out[f"heldout_p1_{rq}x{rc}"] += res[f"{rq}x{rc}"]["P@1"] / len(tasks)
    return out


def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: one process per GPU (NCCL), or gloo on the CPU.
    -> (ddp, rank, world, local rank, device)."""
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return ddp, rank, world, local, device


def prepare_out(args, ddp, world, master, say):
    """Check --out, find the checkpoint to resume from, clear old ones on --overwrite.
    -> (checkpoint or None, the settings in force)."""
    check_writable(args)
    resume_from = latest_checkpoint(args.out, TRAIN_FILES, log=say) if args.resume else None
    used = check_resume(args, resume_from, world) if resume_from else {**vars(args), "world_size": world}
    stale = not args.resume and os.path.isdir(args.out) and any(d.startswith("checkpoint-") for d in os.listdir(args.out))
    if ddp:
        dist.barrier()  # every rank has looked before anything is removed
    if stale:
        if not args.overwrite:
            raise ValueError(f"{args.out} already holds checkpoints: pass --resume to continue from them, "
                             f"--overwrite to start afresh, or another --out")
        if master:
            for d in os.listdir(args.out):
                if d.startswith("checkpoint-"):
                    shutil.rmtree(os.path.join(args.out, d))
                elif d == "latest":
                    os.remove(os.path.join(args.out, d))
        if ddp:
            dist.barrier()
    if args.resume and resume_from is None:
        say(f"--resume: no checkpoint in {args.out}, starting fresh")
    return resume_from, used


def build_model(args, resume_from):
    if resume_from:
        return MetaEmbed.from_pretrained(resume_from)
    R_q, R_c = args.query_tokens, args.candidate_tokens
    groups = ((R_q, R_c),) if args.no_matryoshka else tuple(g for g in GROUPS if g[0] <= R_q and g[1] <= R_c)
    if not args.no_matryoshka and groups[-1] != (R_q, R_c):
        groups += ((R_q, R_c),)
    return MetaEmbed.from_backbone(args.backbone, seed=args.seed, proj_dim=args.proj_dim or None,
                                   num_query_tokens=R_q, num_candidate_tokens=R_c, groups=groups,
                                   temperature=args.temperature, lora=args.lora, max_pixels=args.max_pixels,
                                   min_pixels=args.min_pixels, attn_implementation=args.attn_implementation,
                                   query_suffix=args.query_suffix, lora_vision=args.lora_vision)


def distribute(model, args, ddp, local, device):
    """Gradient checkpointing, then FSDP2 (--fsdp) or DDP. -> (the module to call, trained params)."""
    if args.grad_checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.fsdp and ddp:  # FSDP2: shard each decoder layer, then the rest; parameters become DTensors.
        # Sharding moves each piece to this rank's device as it goes: no GPU ever holds the whole model.
        from torch.distributed.fsdp import fully_shard
        for layer in model.base_model().language_model.layers:
            fully_shard(layer)
        fully_shard(model)
        net = model
    else:
        model.to(device)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local] if device.type == "cuda" else None, find_unused_parameters=True) if ddp else model
    return net, [p for p in model.parameters() if p.requires_grad]   # after sharding (FSDP replaces them)


def make_optimizer(model, params, args, resume_from, fsdp):
    """AdamW, warmup then linear decay; on --resume its state and the RNG. -> (opt, sched, first step)."""
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    start = load_optimizer(resume_from, model, opt, fsdp) if resume_from else 0
    # on resume the loaded param groups hold initial_lr and step `start`'s lr already
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup, args.steps), last_epoch=start - 1)
    return opt, sched, start


class Log:
    """The master's JSON log (one object a step) and progress bar; other ranks log nothing."""

    def __init__(self, args, start, master):
        self.file = open(args.log_file, "a") if (args.log_file and master) else None
        self.bar = None
        if master and not args.no_progress:
            from tqdm import tqdm
            self.bar = tqdm(total=args.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def step(self, rec):
        if self.file:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", **{"samples/s": f"{rec['samples_per_s']:.0f}"})

    def close(self):
        for x in (self.bar, self.file):
            if x:
                x.close()


def train(args):
    ddp, rank, world, local, device = setup_distributed()
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    resume_from, used = prepare_out(args, ddp, world, master, say)
    model = build_model(args, resume_from)
    cfg, fsdp = model.config, args.fsdp and ddp
    net, params = distribute(model, args, ddp, local, device)
    opt, sched, start = make_optimizer(model, params, args, resume_from, fsdp)
    dataset, sampler, heldout = build_data(args, world, rank, start)
    B = args.batch_size
    # the loader's own generator: creating its iterator must not draw from the global RNG, which
    # drives dropout and was just restored on --resume
    collate = functools.partial(data.collate, processor=model.processor, query_suffix=cfg.query_suffix,
                                num_negatives=args.num_negatives)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))
    say(f"MetaEmbed on {args.backbone} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M trained), D={model.dim}, R_q={cfg.num_query_tokens}, "
        f"R_c={cfg.num_candidate_tokens}, groups {cfg.groups}; {args.mixture or args.data}: {len(dataset)} examples; "
        f"{world} process(es) x batch {B}, steps {start}->{args.steps}")
    log = Log(args, start, master)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    no_sync = net.no_sync if isinstance(net, torch.nn.parallel.DistributedDataParallel) else nullcontext
    path, t_start, step = None, time.time(), start
    net.train()
    try:
        for step, (q_in, c_in, neg_mask) in enumerate(loader, start):
            t0 = time.time()
            opt.zero_grad(set_to_none=True)
            if args.grad_cache_chunk:  # the whole batch's loss, activations for a chunk at a time
                loss, per_group = grad_cache_step(net, model, cfg, q_in, c_in, neg_mask, B, rank,
                                                  args.grad_cache_chunk, amp, no_sync)
            else:
                with amp:
                    q, c = net(q_in, c_in)                             # (B, R_q, D), (B + B K, R_c, D)
                loss, per_group = mmr_loss(cfg, q, c, neg_mask, B, rank)
                check_finite(loss)
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            dt = time.time() - t0
            losses = torch.cat([loss.detach().reshape(1), per_group.detach()])
            if ddp:  # log the global batch's loss: the mean over ranks
                dist.all_reduce(losses)
                losses /= world
            rec = {"step": step + 1, "loss": losses[0].item(), "lr": lr,
                   **{f"loss_{rq}x{rc}": l.item() for (rq, rc), l in zip(cfg.groups, losses[1:])},
                   "grad_norm": float(grad_norm), "step_time": dt, "samples_per_s": B * world / dt}
            if isinstance(sampler, MixtureBatches):
                rec["seen"] = sampler.seen(step + 1)                   # examples per source, this rank
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
                rec.update(evaluate_heldout(model, heldout, cfg.groups, B, device))
                net.train()
                say(f"step {step + 1}: held-out P@1 " + ", ".join(
                    f"{k.rsplit('_', 1)[1]} {100 * v:.1f}" for k, v in rec.items() if k.startswith("heldout_p1_")))
            log.step(rec)
            if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                if ddp:
                    dist.barrier()
                saved = save_checkpoint(args.out, step + 1, model, opt, used, fsdp, master)
                if master:
                    path = saved
                    prune_checkpoints(args.out, args.keep)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (main turns it into this): say where to resume
        log.close()
        if master:
            last = latest_checkpoint(args.out, TRAIN_FILES)
            print(f"train.py: stopped during step {step + 1} of {args.steps}; " +
                  (f"{last} is complete: run the same command with --resume to continue from it" if last
                   else "no checkpoint was written yet"), file=sys.stderr)
        raise
    log.close()
    if path:
        say(f"done in {time.time() - t_start:.0f}s; checkpoint: {path} "
            f"(evaluate: python evaluate.py --checkpoint {args.out})")
    else:
        say(f"nothing to do: {args.out} is already at step {start} of {args.steps}")
    if ddp:
        # Drop DDP's reducer before the process group: destroy_process_group then shuts gloo down
        # with the GIL released. Freed last (at exit) the reducer holds the group's last reference,
        # and gloo's teardown can deadlock on the GIL. Every reference goes: the bound no_sync too.
        del net, no_sync, loader
        dist.barrier()
        dist.destroy_process_group()
    return path


def check_writable(args):
    """--out (and --log-file) can be written: found now, not at the first checkpoint hours later."""
    for what, path in (("--out", args.out), ("--log-file", args.log_file)):
        if path is None:
            continue
        try:
            if what == "--out":
                os.makedirs(path, exist_ok=True)
                probe = os.path.join(path, f".write-test-{os.getpid()}")
                with open(probe, "w"):
                    pass
                os.remove(probe)
            else:
                with open(path, "a"):
                    pass
        except OSError as e:
            raise PermissionError(f"cannot write {what} {path}: {e.strerror or e}") from None


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None):
    args = get_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)   # SIGTERM (a scheduler's stop) ends like Ctrl-C
    try:
        return train(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, FileNotFoundError, PermissionError, FloatingPointError) as e:
        sys.exit(f"train.py: error: {e}")


if __name__ == "__main__":
    main()
