"""
Train MetaEmbed with the Matryoshka Multi-Vector Retrieval loss.

    python train.py                                   # offline: tiny backbone, synthetic data, CPU
    python train.py --backbone qwen2-vl-2b --data mmeb-train --mmeb-train TIGER-Lab/MMEB-train \\
        --images DIR --subsets ImageNet_1K CIRR        # the real thing, on a GPU
    torchrun --nproc_per_node 8 train.py --recipe paper --images DIR   # the official run (DDP; --fsdp shards)

Checkpoints: OUT/checkpoint-STEP (the save_pretrained format plus the optimizer state), written to
a temporary folder and renamed; OUT/latest names the newest. --resume continues from it with the
same data order.

Read top to bottom in the paper's order: the loss of a batch, the step (GradCache in one place),
the loop; then the set-up, the recipes and the command line. The run folder's rules (resume,
refuse changed settings, overwrite) and the log are machinery/checkpoints.py's.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
import torch.distributed as dist

import data
import evaluate
from machinery import checkpoints, checks, distributed, hub
from machinery.backbones import BACKBONES, OFFLINE, check_backbone, is_offline
from metaembed import TEMPERATURE, MetaEmbed, MetaEmbedConfig, group_losses, weighted_mean


# -----------------------------------------------------------------------------
# the loss of one batch: this rank's queries against every rank's positives and its own negatives

def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' x concatenated in rank order; the gradient flows back to each rank's own rows
    (summed over ranks by a reduce-scatter)."""
    if not dist.is_initialized():
        return x
    from torch.distributed._functional_collectives import all_gather_tensor_autograd
    return all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def mmr_loss(cfg: MetaEmbedConfig, q: torch.Tensor, c: torch.Tensor, neg_mask: torch.Tensor | None = None,
             rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The MMR loss of one local batch's embeddings, in fp32, and the loss per group (|G|,).
    q (B, R_q, D); c (B + B K, R_c, D): B positives, then B K hard negatives (query-major) if
    neg_mask (B, K) is given, the layout of data.collate. Positives are gathered from every rank
    with gradient (this rank's at row rank * B: logits (B, B * world + K)); negatives stay local."""
    B = q.shape[0]
    pos, neg = c[:B], None
    if neg_mask is not None:
        neg = c[B:].view(B, neg_mask.shape[1], *c.shape[1:])              # (B, K, R_c, D)
        neg_mask = neg_mask.to(q.device)
    pos_all = gather_with_grad(pos)                                     # (B * world, R_c, D)
    losses = group_losses(q.float(), pos_all.float(), None if neg is None else neg.float(), cfg.groups,
                          cfg.temperature, offset=rank * B, neg_mask=neg_mask)          # (|G|,)
    return weighted_mean(losses, cfg.group_weights), losses             # L = sum_g w_g L_g / |G|


def check_finite(loss: torch.Tensor) -> None:
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"the loss is {loss.item()}: lower --lr or check the data")


# -----------------------------------------------------------------------------
# the step: one batch's loss and gradients, whole or with GradCache

def train_step(net: torch.nn.Module, model: MetaEmbed, batch: tuple, rank: int = 0, chunk: int = 0,
               amp: ContextManager = nullcontext(), no_sync: Callable = nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """batch (query inputs, candidate inputs, neg_mask) -> (loss, loss per group), detached, with
    the parameters' gradients accumulated. chunk = 0: one forward and backward of the whole batch.
    chunk > 0: GradCache (Gao et al., 2021): 1) every chunk's embeddings without a graph; 2) the
    loss on all of them (all ranks' positives gathered) and its gradient w.r.t. the embeddings;
    3) each chunk again with a graph, back-propagated against its slice of that gradient, with the
    RNG state of its first pass (same dropout). Parameter gradients equal the full batch's."""
    q_in, c_in, neg_mask = batch
    cfg = model.config
    if not chunk:
        with amp:
            q, c = net(q_in, c_in)                                     # (B, R_q, D), (B + B K, R_c, D)
        loss, per_group = mmr_loss(cfg, q, c, neg_mask, rank)
        check_finite(loss)
        loss.backward()
        return loss.detach(), per_group.detach()
    img = model.backbone.config.image_token_id
    parts = [(side, inputs, lo, min(lo + chunk, n)) for side, inputs in (("query", q_in), ("candidate", c_in))
             for n in [inputs["input_ids"].shape[0]] for lo in range(0, n, chunk)]

    def embed(side, inputs, lo, hi):
        with amp:
            q, c = net(rows_of(inputs, lo, hi, img), None) if side == "query" else net(None, rows_of(inputs, lo, hi, img))
        return q if side == "query" else c
    states, embs = [], {"query": [], "candidate": []}
    with torch.no_grad():
        for part in parts:
            states.append(_rng_state())
            embs[part[0]].append(embed(*part))
    q = torch.cat(embs["query"]).requires_grad_()                         # (B, R_q, D), a leaf
    c = torch.cat(embs["candidate"]).requires_grad_()                     # (B + B K, R_c, D)
    loss, per_group = mmr_loss(cfg, q, c, neg_mask, rank)
    check_finite(loss)
    loss.backward()                                                       # -> q.grad, c.grad
    for k, (side, inputs, lo, hi) in enumerate(parts):
        with torch.random.fork_rng(devices=[q.device] if q.is_cuda else []), \
                (no_sync() if k < len(parts) - 1 else nullcontext()):     # DDP: all-reduce once, at the end
            _set_rng_state(states[k])
            embed(side, inputs, lo, hi).backward((q.grad if side == "query" else c.grad)[lo:hi])
    return loss.detach(), per_group.detach()


# GradCache's pieces: one chunk's rows of a batch, the RNG state replayed for its second pass

def rows_of(inputs: dict, lo: int, hi: int, image_token_id: int) -> dict:
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


def _rng_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def _set_rng_state(state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


# -----------------------------------------------------------------------------
# the loop

def train(args: argparse.Namespace) -> str | None:
    ddp, rank, world, local, device = distributed.setup()
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    say(f"train.py: checkpoints go to {args.out}")
    if not args.resume:  # one line, before --out is written, if the backbone cannot be had (a resumed run's
        check_backbone(args.backbone)  # backbone is checked against the checkpoint's first)
    mix = load_mixture(args, say) if args.mixture else None   # every source checked before the backbone is built
    resume_from, used = checkpoints.prepare_out(args, world, master, say, ddp)
    used["trained_on"] = checkpoints.check_same_data(resume_from, checkpoints.data_record(args.mixture, mix))
    model = build_model(args, resume_from)
    cfg, fsdp = model.config, args.fsdp and ddp
    net, params = distributed.distribute(model, ddp, local, device, fsdp, args.grad_checkpointing)
    opt, sched, start = make_optimizer(model, params, args, resume_from, fsdp)
    dataset, sampler, heldout = build_data(args, world, rank, start, mix)
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
    log = checkpoints.Log(args, start, master)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    no_sync = net.no_sync if isinstance(net, torch.nn.parallel.DistributedDataParallel) else nullcontext
    path, t_start, step = None, time.time(), start
    net.train()
    try:
        for step, (q_in, c_in, neg_mask) in enumerate(loader, start):
            t0 = time.time()
            opt.zero_grad(set_to_none=True)
            loss, per_group = train_step(net, model, (q_in, c_in, neg_mask), rank, args.grad_cache_chunk, amp, no_sync)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            dt = time.time() - t0
            losses = distributed.mean_over_ranks(torch.cat([loss.reshape(1), per_group]), ddp)
            rec = {"step": step + 1, "loss": losses[0].item(), "lr": lr,
                   **{f"loss_{g}": l.item() for g, l in zip(cfg.groups, losses[1:])},
                   "grad_norm": float(grad_norm), "step_time": dt, "samples_per_s": B * world / dt,
                   "hard_negatives": 0 if neg_mask is None else int(neg_mask[:, 0].sum())}   # queries with one, this rank
            if isinstance(sampler, data.MixtureBatches):
                rec["seen"] = sampler.seen(step + 1)                   # examples per source, this rank
            if args.skip_bad_rows:                                     # rows skipped in this batch, this rank
                rec["skipped_rows"] = len(q_in.get("skipped_rows", ()))
                for said in q_in.get("skipped_rows", ()):
                    print(f"train.py: step {step + 1}: skipped {said}", file=sys.stderr)
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
                rec.update(evaluate.heldout_p_at_1(model, heldout, cfg.groups, B, device))
                net.train()
                say(f"step {step + 1}: held-out P@1 " + ", ".join(
                    f"{k.rsplit('_', 1)[1]} {100 * v:.1f}" for k, v in rec.items() if k.startswith("heldout_p1_")))
            log.step(rec)
            if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                distributed.barrier(ddp)
                saved = checkpoints.save_checkpoint(args.out, step + 1, model, opt, used, fsdp, master)
                if master:
                    path = saved
                    checkpoints.prune_checkpoints(args.out, args.keep)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (main turns it into this): say where to resume
        log.close()
        if master:
            last = checkpoints.latest_checkpoint(args.out, checkpoints.TRAIN_FILES)
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
        del net, no_sync, loader     # every reference to DDP's reducer (the bound no_sync too), first
        distributed.teardown()
    return path


# -----------------------------------------------------------------------------
# set-up: data, model, optimizer

def load_mixture(args: argparse.Namespace, say: Callable) -> hub.Mixture:
    """--mixture: every source opened and its first row read (one error naming every source that
    cannot be), before the backbone is built; what each source lacks said once, here."""
    mix = hub.load_mixture(args.mixture, args.images, args.holdout, args.seed, args.mmeb_train, args.skip_bad_rows)
    for note in mix.notes:
        say(f"train.py: {note}")
    if args.num_negatives:
        short = []
        for name, src, n in zip(mix.names, mix.sources, mix.negatives):
            if n == 0:
                say(f"train.py: {name}: no hard negatives in this copy: in-batch negatives only")
            elif n < len(src):
                say(f"train.py: {name}: hard negatives on {n} of {len(src)} training rows; the rest: in-batch only")
            if n < len(src):
                short.append(f"{name} ({n} of {len(src)} rows)")
        if args.require_negatives and short:
            raise ValueError(f"--require-negatives: source(s) without a hard negative on every row: {', '.join(short)}")
    return mix


def build_data(args: argparse.Namespace, world: int, rank: int, start: int, mix: hub.Mixture | None = None) -> tuple:
    """-> (dataset, batch sampler, held-out retrieval tasks for --eval-every)."""
    order = data.Order(args.batch_size, world, rank, args.seed, start, args.steps)
    if mix is not None:
        sampler = data.MixtureBatches(mix, order, args.source_run, args.shuffle_buffer)
        return mix, sampler, {n: evaluate.heldout_task(s) for n, s in zip(mix.names, mix.heldout)}
    if args.data == "synthetic":
        lo, hi = data.parse_objects(args.objects)
        ds = data.SyntheticPairs(args.synthetic_size, seed=args.seed, min_objects=lo, max_objects=hi)
        heldout = data.synthetic_eval(args.holdout, n_variants=1, seed=args.seed + 1, min_objects=lo, max_objects=hi)
    elif args.data == "mmeb-train":
        ds, heldout = hub.load_mmeb_train(args.mmeb_train, args.subsets, args.images, args.max_per_subset), {}
    else:
        ds, heldout = hub.load_colpali_train(args.colpali_train), {}
    return ds, data.StepBatches(len(ds), order), heldout


def build_model(args: argparse.Namespace, resume_from: str | None) -> MetaEmbed:
    if resume_from:
        return MetaEmbed.from_pretrained(resume_from)
    R_q, R_c = args.query_tokens, args.candidate_tokens
    return MetaEmbed.from_backbone(args.backbone, seed=args.seed, proj_dim=args.proj_dim or None,
                                   num_query_tokens=R_q, num_candidate_tokens=R_c,
                                   groups=((R_q, R_c),) if args.no_matryoshka else None,
                                   temperature=args.temperature, lora=args.lora, max_pixels=args.max_pixels,
                                   max_visual_tokens=args.max_visual_tokens,
                                   min_pixels=args.min_pixels, attn_implementation=args.attn_implementation,
                                   query_suffix=args.query_suffix, lora_vision=args.lora_vision)


def lr_lambda(warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warmup to the peak, then linear decay to 0 at `steps`."""
    return lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))


def make_optimizer(model: MetaEmbed, params: list, args: argparse.Namespace, resume_from: str | None,
                   fsdp: bool) -> tuple:
    """AdamW, warmup then linear decay; on --resume its state and the RNG. -> (opt, sched, first step)."""
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    start = checkpoints.load_optimizer(resume_from, model, opt, fsdp) if resume_from else 0
    # on resume the loaded param groups hold initial_lr and step `start`'s lr already
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup, args.steps), last_epoch=start - 1)
    return opt, sched, start


# -----------------------------------------------------------------------------
# the command line: recipes (the defaults of a kind of run, applied as argparse defaults:
# flags given still win) and the flags

RECIPES = {
    # the offline default: tiny backbone, synthetic scenes, a few minutes on a laptop CPU
    "tiny": dict(steps=1200, batch_size=32, lr=2e-3, warmup=100, proj_dim=4, out="out/tiny-synthetic"),
    # any real backbone: the paper's optimisation (--out defaults to out/<backbone>-<data>)
    "real": dict(steps=4000, batch_size=48, lr=1e-4, warmup=500, proj_dim=0, out=None),
    # --recipe paper: what the official 7b_mrl.yaml sets (batch is per device: 48 x GPUs in all)
    "paper": dict(backbone="qwen2.5-vl-7b", mixture=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                  "mixtures", "paper.yaml"), lora=True, lr=1e-4, warmup=500, steps=4000, batch_size=48,
                  num_negatives=1, source_run=32, shuffle_buffer=1000, holdout=100, max_visual_tokens=1024,
                  query_suffix=True, grad_checkpointing=True, temperature=TEMPERATURE, query_tokens=16,
                  candidate_tokens=64, proj_dim=0, out="out/metaembed-paper"),
}


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=["paper"], help="paper: every setting of the official 7b_mrl.yaml (the "
                   "mixture, LoRA, lr, warmup, steps, per-device batch, negatives, image cap, prompts); printed; "
                   "flags given explicitly still win")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="tiny", help=f"offline: {', '.join(OFFLINE)}; an alias: "
                   f"{', '.join(BACKBONES)}; or a hub id or local folder of those types (default: tiny)")
    g.add_argument("--proj-dim", type=int, help="per-vector projection size, 0 = none (default: 4 for tiny, "
                   "none otherwise)")
    g.add_argument("--query-tokens", type=int, default=16, help="R_q (default 16)")
    g.add_argument("--candidate-tokens", type=int, default=64, help="R_c (default 64)")
    g.add_argument("--temperature", type=float, default=TEMPERATURE)
    g.add_argument("--no-matryoshka", action="store_true",
                   help="ablation: train only the full group (R_q, R_c), no nested prefixes")
    g.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRA r=32 on the backbone (default: on for real backbones, off for tiny)")
    g.add_argument("--lora-vision", action="store_true", help="LoRA on the vision tower too (the official run: "
                   "the language model only)")
    g.add_argument("--grad-checkpointing", action="store_true", help="trade compute for memory")
    g.add_argument("--max-pixels", type=int, help="cap on an image's pixels, so its visual tokens (default: "
                   "1024 tokens = 802816 for real backbones, as the official config; tiny: its own bound)")
    g.add_argument("--max-visual-tokens", type=int, help="cap on an image's visual tokens, in the backbone family's "
                   "pixels (a token is 28x28 px on Qwen2/2.5-VL, 32x32 on Qwen3-VL/3.5); --max-pixels wins "
                   "(--recipe paper: 1024)")
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
    g.add_argument("--shuffle-buffer", type=int, default=0, metavar="N", help="with --mixture: pass each rank's "
                   "stream through a shuffle buffer of N examples, which mixes the runs of a batch (the official "
                   "run's shuffle(seed=42) after the split: --recipe paper sets 1000; 0 = batches of whole runs)")
    g.add_argument("--holdout", type=int, default=100, help="rows held out per source for --eval-every (the last "
                   "ones of each mixture source; synthetic: this many eval scenes)")
    g.add_argument("--num-negatives", type=int, default=1, help="hard negatives per query, K (rows with fewer "
                   "repeat their last; 0 = in-batch negatives only)")
    g.add_argument("--skip-bad-rows", action="store_true", help="with --mixture: a row whose image cannot be decoded "
                   "is skipped (the next good row of its source in its place, the same on --resume) and counted in "
                   "the log; without it such a row stops the run, naming the source and the row")
    g.add_argument("--require-negatives", action="store_true", help="with --mixture: refuse to start unless every "
                   "training row of every source has a hard negative")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="optimizer steps (default: 1200 tiny, 4000 real)")
    g.add_argument("--batch-size", type=int, help="queries per device per step (default: 32 tiny, 48 real)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 2e-3 tiny, 1e-4 real)")
    g.add_argument("--warmup", type=int, help="linear warmup steps, then linear decay to 0 (default: 100 tiny, "
                   "500 real)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    g.add_argument("--grad-cache-chunk", type=int, default=0, metavar="N",
                   help="GradCache: hold activations for only N rows at a time, with the whole batch's loss and "
                   "gradients (a large --batch-size on few GPUs; 0 = off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--fsdp", action="store_true", help="shard the backbone across ranks (FSDP2)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="checkpoint folder (default: out/tiny-synthetic for the offline default, "
                   "out/metaembed-paper for --recipe paper, else out/<backbone>-<data>)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept (older ones removed)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an OUT that holds checkpoints "
                   "(its checkpoints are removed)")
    g.add_argument("--log-file", help="append one JSON object per step (step, loss, lr, loss per group)")
    g.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="every N steps (and at the end): P@1 on held-out rows at each Matryoshka group, logged")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--default-budget", metavar="AxB", help="the budget a checkpoint loaded as a sentence-transformers "
                   "MultiVectorEncoder encodes at when no num_vectors is given, so in mteb (default: all vectors)")
    first, _ = p.parse_known_args(argv)           # which recipe: --recipe, else by the backbone
    recipe = first.recipe or ("tiny" if is_offline(first.backbone) else "real")
    p.set_defaults(**RECIPES[recipe])
    args = p.parse_args(argv)
    if args.recipe:
        given = [k for k, v in RECIPES[recipe].items() if getattr(args, k) != v]
        print(f"--recipe {recipe}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in RECIPES[recipe].items()
                                                 if k not in given) + (f" (given: {', '.join(given)})" if given else ""))
    if args.out is None:  # out/<backbone>-<data>: a folder's or hub id's last part names the backbone
        name = os.path.basename(os.path.normpath(args.backbone)) or "backbone"
        data_name = os.path.splitext(os.path.basename(args.mixture))[0] if args.mixture else args.data
        args.out = os.path.join("out", f"{name}-{data_name}")
    if args.data == "mmeb-train" and not args.subsets:
        p.error("--data mmeb-train needs --subsets (e.g. --subsets ImageNet_1K CIRR)")
    # every check that can be made before training starts is made here, not at the first checkpoint
    checks.at_least(p.error, args, steps=1, batch_size=1, save_every=1, keep=1, query_tokens=1, candidate_tokens=1,
                    synthetic_size=1, workers=0, warmup=0, proj_dim=0, source_run=1, holdout=1, num_negatives=0,
                    grad_cache_chunk=0, eval_every=0, shuffle_buffer=0)
    checks.positive(p.error, args, "lr", "temperature", "clip", "max_pixels", "min_pixels", "max_per_subset",
                    "max_visual_tokens")
    if args.weight_decay < 0:
        p.error(f"--weight-decay must be at least 0, got {args.weight_decay}")
    checks.parses(p.error, "--objects", data.parse_objects, args.objects)
    config = MetaEmbedConfig(num_query_tokens=args.query_tokens, num_candidate_tokens=args.candidate_tokens)
    checks.parses(p.error, "--default-budget", functools.partial(config.budget, name="default-budget"), args.default_budget)
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> str | None:
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
