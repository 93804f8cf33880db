"""Checkpoints: the model folder (safetensors + json, never pickle), its integrity checks,
train.py's checkpoint-STEP folders (plus optimizer and RNG state), latest / resolve, pruning
and atomic writes; train.py's run folder: which settings a resumed run may change, --out's
set-up (resume, refuse changed settings, overwrite) and the JSON log."""
import hashlib
import json
import os
import re
import shutil

import torch

from machinery import checks, distributed

MODEL_FILES = ("metaembed.json", "model.safetensors", "config.json", "tokenizer.json",
               "tokenizer_config.json", "preprocessor_config.json")
TRAIN_FILES = MODEL_FILES + ("optimizer.safetensors", "trainer_state.json")   # a resumable checkpoint
DEFAULT_CHECKPOINT = "out/tiny-synthetic"   # where `python train.py` (the offline default) writes


def write_atomic(path, text):
    """Write a text file whole or not at all: to PATH.tmp, then renamed over PATH."""
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def replace_dir(tmp, path):
    """Atomically move a finished folder into place (the old one is removed only after)."""
    old = path.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# the model folder

def save_model(path, state, config, parts, extra=None):
    """Write metaembed.json (config, a dict), model.safetensors (state) and each of `parts` (objects
    with save_pretrained: the backbone config, tokenizer, image processor) to a temporary
    folder, extra(folder) there too (more files), then rename it into place."""
    from safetensors.torch import save_file
    path = os.fspath(path)
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "metaembed.json"), "w") as f:
        json.dump(config, f, indent=2)
    for part in parts:
        part.save_pretrained(tmp)
    if extra is not None:
        extra(tmp)
    replace_dir(tmp, path)


def read_config(path):
    """metaembed.json of a checkpoint folder, after every file is checked (a missing config.json
    would otherwise build transformers' default, 80-layer, Qwen2-VL)."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "metaembed.json")):
        raise FileNotFoundError(f"{path!r} is not a MetaEmbed checkpoint: no metaembed.json in it")
    problem = checkpoint_problem(path)
    if problem:
        raise FileNotFoundError(f"checkpoint {path!r} is incomplete: {problem}")
    with open(os.path.join(path, "metaembed.json")) as f:
        return json.load(f)


def load_weights(model, path):
    """model.safetensors into a model built from the checkpoint's config: every trained parameter
    must be there, and nothing unknown."""
    from safetensors.torch import load_file
    state = load_file(os.path.join(path, "model.safetensors"))
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    missing = [k for k in model.trained_parameters() if k not in state]
    if unknown or missing:
        raise ValueError(f"checkpoint {path!r} does not match its model: unknown {unknown[:3]}, missing {missing[:3]}")
    model.load_state_dict(state, strict=False)


def fingerprint(path):
    """A checkpoint's identity by content: sha256 over its model files (weights, config,
    processor), 16 hex digits. Not its path or backbone name: a folder retrained in place
    (train.py --overwrite) gets another fingerprint."""
    h = hashlib.sha256()
    for name in MODEL_FILES:
        h.update(name.encode())
        with open(os.path.join(path, name), "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()[:16]


def checkpoint_problem(path, files=MODEL_FILES):
    """None if the folder holds every file a checkpoint needs, whole; else what is wrong, in words
    (a missing file, unreadable JSON, a safetensors file shorter than its header says)."""
    if not os.path.isdir(path):
        return f"{path} does not exist"
    for name in files:
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            return f"{name} is missing"
        try:
            if name.endswith(".json"):
                with open(f) as fh:
                    json.load(fh)
            elif name.endswith(".safetensors"):
                with open(f, "rb") as fh:  # 8-byte header length, JSON header, then the data
                    n = int.from_bytes(fh.read(8), "little")
                    header = json.loads(fh.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if os.path.getsize(f) != 8 + n + end:
                    return f"{name} is truncated ({os.path.getsize(f)} bytes; its header says {8 + n + end})"
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError) as e:
            return f"{name} is corrupt ({type(e).__name__}: {str(e)[:80]})"
    return None


def resolve_checkpoint(path, log=None, hint=""):
    """A checkpoint folder, or a train.py --out folder (the newest complete checkpoint in it);
    hint: what to say if there is none."""
    if os.path.isfile(os.path.join(path, "metaembed.json")):
        return path
    found = latest_checkpoint(path, log=log)
    if found:
        return found
    raise FileNotFoundError(f"no MetaEmbed checkpoint at {path!r}{hint}")


def find_for_tool(path, tool, hint=""):
    """A command-line tool's checkpoint: the folder at `path`, or the newest in a train.py --out
    folder; fallbacks said on stderr as `tool`; the offline default's absence says to train first."""
    import sys

    hint = f": run `python train.py` first{hint}" if os.path.normpath(path) == os.path.normpath(DEFAULT_CHECKPOINT) else ""
    return resolve_checkpoint(path, log=lambda m: print(f"{tool}: {m}", file=sys.stderr), hint=hint)


def latest_checkpoint(out, files=MODEL_FILES, log=None):
    """The checkpoint to continue from in a train.py --out folder: the one OUT/latest names, or,
    if that one is missing or incomplete, the newest complete other (said through `log`). None if
    OUT holds no checkpoint; raises if it holds some but none is complete."""
    try:
        with open(os.path.join(out, "latest")) as f:
            named = os.path.join(out, f.read().strip())
    except (FileNotFoundError, NotADirectoryError):
        named = None
    if named and not checkpoint_problem(named, files):
        return named
    found = sorted(d for d in (os.listdir(out) if os.path.isdir(out) else []) if re.fullmatch(r"checkpoint-\d+", d))
    if not found and not named:
        return None
    why = f"{out}/latest names {os.path.basename(named)}: {checkpoint_problem(named, files)}" if named else \
        f"{out}/latest is missing"
    complete = [d for d in reversed(found) if not checkpoint_problem(os.path.join(out, d), files)]
    if not complete:
        raise FileNotFoundError(f"no complete checkpoint in {out} ({why}; " + "; ".join(
            f"{d}: {checkpoint_problem(os.path.join(out, d), files)}" for d in found) + ")")
    if log:
        log(f"{why}; continuing from {complete[0]}, the newest complete checkpoint")
    return os.path.join(out, complete[0])


# -----------------------------------------------------------------------------
# train.py's checkpoints: model + optimizer state (safetensors + json) + RNG

def save_checkpoint(out, step, model, opt, args, fsdp=False, master=True):
    """Every rank calls this (FSDP gathers the full state from all); the master writes
    OUT/checkpoint-STEP. args: a dict of the settings in force (recorded as train_args.json)."""
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
    model.save_pretrained(final, state_dict=model_sd, budget=args.get("default_budget"))  # atomic: a tmp folder, renamed
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


def prune_checkpoints(out, keep):
    """Keep the newest `keep` checkpoints up to the one OUT/latest names; never remove that one or
    anything newer (a newer folder is the user's to judge)."""
    with open(os.path.join(out, "latest")) as f:
        latest = f.read().strip()
    older = sorted(d for d in os.listdir(out) if re.fullmatch(r"checkpoint-\d+", d) and d <= latest)
    for d in older[:-keep]:
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)


def clear_checkpoints(out):
    """--overwrite: remove OUT's checkpoints and its latest pointer (nothing else in OUT)."""
    for d in os.listdir(out):
        if d.startswith("checkpoint-"):
            shutil.rmtree(os.path.join(out, d))
        elif d == "latest":
            os.remove(os.path.join(out, d))


# -----------------------------------------------------------------------------
# what a run trains on: recorded in train_args.json, and a resumed run must train on the same

DATA_FIELDS = ("weight", "num_samples", "subset", "split")   # a mixture entry's fields that change the data


def data_record(mixture_file, mixture):
    """What a --mixture run trains on (None without one): the mixture file (path, sha256, each
    source's entry in order) and each source by content: rows in its table, rows used, and a
    sha256 of its first training row and its last row used, read undecoded (a copy moved elsewhere
    is the same source; an edit that keeps the row count and both end rows is not seen)."""
    if mixture is None:
        return None
    with open(mixture_file, "rb") as f:
        text = f.read()
    sources = {}
    for name, train, held in zip(mixture.names, mixture.sources, mixture.heldout):
        table, h = train.ds.with_format("arrow"), hashlib.sha256()
        for row in (train.rows[0], held.rows[-1]):
            h.update(repr(table[row].to_pylist()).encode())
        sources[str(name)] = {**{k: mixture.spec[name].get(k) for k in (*DATA_FIELDS, "path")},
                              "table_rows": len(train.ds), "rows": len(train) + len(held),
                              "end_rows_sha256": h.hexdigest()[:16]}
    return {"mixture": os.path.abspath(mixture_file), "mixture_sha256": hashlib.sha256(text).hexdigest(),
            "sources": sources}


def check_same_data(path, record):
    """--resume from checkpoint `path` (None: a fresh run) trains on the data it was trained on, or
    refuses naming each source and what changed: the sources and their order, a weight, cap, subset
    or split, a source's rows (a path swapped, a copy edited). A checkpoint from before the record
    was kept is resumed unchecked. -> record (what this run saves)."""
    if path is None:
        return record
    with open(os.path.join(path, "train_args.json")) as f:
        saved = json.load(f).get("trained_on")
    if saved is None or record is None:
        return record                       # no record kept, or no mixture: --mixture itself is a setting
    was, now, said = saved["sources"], record["sources"], []
    if list(was) != list(now):
        said.append(f"sources {', '.join(was)} -> {', '.join(now)}")
    for name in [n for n in now if n in was]:
        a, b = was[name], now[name]
        said += [f"{name}: {k} {a.get(k)!r} -> {b.get(k)!r}" for k in DATA_FIELDS if a.get(k) != b.get(k)]
        if (a["table_rows"], a["rows"], a["end_rows_sha256"]) != (b["table_rows"], b["rows"], b["end_rows_sha256"]):
            moved = f"; path {a.get('path')!r} -> {b.get('path')!r}" if a.get("path") != b.get("path") else ""
            said.append(f"{name}: its rows differ ({a['rows']} of {a['table_rows']} rows -> {b['rows']} of "
                        f"{b['table_rows']} rows{', other first or last rows' if a['rows'] == b['rows'] else ''}{moved})")
    if said:
        raise ValueError(f"--resume from {path} on other data than it was trained on (mixture {record['mixture']}: "
                         f"{'; '.join(said)}): resume with the same mixture and sources, or train afresh into "
                         f"another --out")
    return record


# train.py's output folder: resume, refuse changed settings, overwrite; its log

# Settings a resumed run may change (they decide where and how things run, not what is computed);
# any other must match the checkpoint's train_args.json.
# GradCache chunks give the full batch's gradients by design (a smaller GPU, smaller chunks); only
# LoRA dropout draws its masks per chunk, so a changed --grad-cache-chunk is said, not refused.
SAFE_TO_CHANGE = {"out", "resume", "overwrite", "save_every", "keep", "log_file", "no_progress", "workers",
                  "grad_checkpointing", "attn_implementation", "fsdp", "images", "eval_every", "grad_cache_chunk",
                  "require_negatives", "default_budget", "skip_bad_rows"}


def check_resume(settings, path):
    """Refuse to resume with settings that change the model, the loss, the optimisation or the data
    order; settings: this run's, world_size included. -> the settings actually in force (the
    checkpoint's, plus what may change)."""
    with open(os.path.join(path, "train_args.json")) as f:
        saved = json.load(f)
    saved.setdefault("world_size", settings["world_size"])        # checkpoints from before it was recorded
    diff = {k: (saved[k], settings[k]) for k in saved
            if k in settings and k not in SAFE_TO_CHANGE and saved[k] != settings[k]}
    if diff:
        said = ", ".join(f"{'--' + k.replace('_', '-') if k != 'world_size' else 'processes'} {a!r} -> {b!r}"
                         for k, (a, b) in diff.items())
        raise ValueError(f"--resume from {path} with other settings than it was trained with ({said}): "
                         f"resume with the same ones (only "
                         f"{', '.join(sorted(SAFE_TO_CHANGE - {'resume', 'out', 'overwrite'}))} "
                         f"may change), or train afresh into another --out")
    if saved.get("grad_cache_chunk", 0) != settings.get("grad_cache_chunk", 0):
        print(f"--resume: --grad-cache-chunk {saved.get('grad_cache_chunk', 0)} -> {settings['grad_cache_chunk']}: the "
              f"same gradients; with LoRA, dropout masks are drawn per chunk, so the run will not repeat an "
              f"uninterrupted one exactly")
    return {**saved, **{k: settings[k] for k in SAFE_TO_CHANGE if k in settings}}


def prepare_out(args, world, master, say, ddp=False):
    """train.py's set-up of --out: check --out and --log-file, find the checkpoint to resume from, clear old ones on
    --overwrite. -> (checkpoint or None, the settings in force)."""
    checks.writable_dir(checks.refuse, "--out", args.out)
    if args.log_file:
        checks.writable_file(checks.refuse, "--log-file", args.log_file)
    resume_from = latest_checkpoint(args.out, TRAIN_FILES, log=say) if args.resume else None
    settings = {**vars(args), "world_size": world}
    used = check_resume(settings, resume_from) if resume_from else settings
    stale = not args.resume and any(d.startswith("checkpoint-") for d in os.listdir(args.out))
    distributed.barrier(ddp)  # every rank has looked before anything is removed
    if stale:
        if not args.overwrite:
            raise ValueError(f"{args.out} already holds checkpoints: pass --resume to continue from them, "
                             f"--overwrite to start afresh, or another --out")
        if master:
            clear_checkpoints(args.out)
        distributed.barrier(ddp)
    if args.resume and resume_from is None:
        say(f"--resume: no checkpoint in {args.out}, starting fresh")
    return resume_from, used


class Log:
    """The master's JSON log (one object a step) and progress bar; other ranks log nothing."""

    def __init__(self, args, start, master):
        self.file = open(args.log_file, "a") if (args.log_file and master) else None
        if self.file and start:   # a resumed run: the steps after `start` logged before the stop are done again
            self.file.write(json.dumps({"resumed_at_step": start, "note": f"steps after {start} above this line "
                                        "were cut short and are repeated below"}) + "\n")
            self.file.flush()
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
