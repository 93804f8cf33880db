"""train.py: a short run learns, resume is exact, 2 processes (gloo) == 1 process."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from machinery import checkpoints, hub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--query-tokens", "4", "--candidate-tokens", "8", "--synthetic-size", "400", "--no-progress",
         "--lr", "3e-3", "--warmup", "2"]


def run(tmp_path, name, *extra):
    out = tmp_path / name
    log = tmp_path / f"{name}.jsonl"
    args = train.get_args(SMALL + ["--out", str(out), "--log-file", str(log)] + list(extra))
    path = train.train(args)
    return path, [r for r in map(json.loads, log.read_text().splitlines()) if "step" in r]   # a resume's marker aside


def crash_at_batch(monkeypatch, n, fn):
    """Run fn with collate raising KeyboardInterrupt (a crash) while building batch n."""
    calls, collate = [], train.data.collate

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("simulated crash")
        return collate(*a, **k)
    monkeypatch.setattr(train.data, "collate", crashing)
    with pytest.raises(KeyboardInterrupt):
        fn()
    monkeypatch.setattr(train.data, "collate", collate)


# 17. what a resume may change
def test_resume_allows_grad_cache_and_eval_every(tmp_path, capsys):
    common = ["--steps", "4", "--batch-size", "4", "--save-every", "2"]
    run(tmp_path, "r", *common)
    shutil.rmtree(tmp_path / "r" / "checkpoint-0000004")
    run(tmp_path, "r", *common, "--grad-cache-chunk", "2", "--eval-every", "3", "--resume")
    assert "--grad-cache-chunk 0 -> 2: the same gradients" in capsys.readouterr().out
    used = json.load(open(tmp_path / "r" / "checkpoint-0000004" / "train_args.json"))   # the settings in force
    assert (used["grad_cache_chunk"], used["eval_every"], used["steps"]) == (2, 3, 4)


def test_batch_order_is_a_function_of_step():
    a = train.data.batch_indices(5, 100, 8, seed=0)
    assert a == train.data.batch_indices(5, 100, 8, seed=0) and len(a) == 8
    epoch0 = sum((train.data.batch_indices(s, 100, 8, 0) for s in range(12)), [])
    assert len(set(epoch0)) == 96           # one epoch: no repeats, last partial batch dropped
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train.data.batch_indices(0, 3, 8, 0)


def test_lr_schedule():
    f = train.lr_lambda(10, 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == 0.0


def test_short_run_lowers_loss(tmp_path):
    path, log = run(tmp_path, "run", "--steps", "40", "--batch-size", "8", "--save-every", "20")
    assert [r["step"] for r in log] == list(range(1, 41))
    assert {"loss", "lr", "loss_1x1", "loss_4x8"} <= set(log[0])
    first = sum(r["loss"] for r in log[:5]) / 5
    last = sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert os.path.basename(path) == "checkpoint-0000040"
    assert (tmp_path / "run" / "latest").read_text() == "checkpoint-0000040"
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-0000020", "checkpoint-0000040", "latest"]
    # a fresh run into a folder with checkpoints must say so, not mix with them
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume.*--overwrite"):
        run(tmp_path, "run", "--steps", "40", "--batch-size", "8")


@pytest.mark.parametrize("extra", [[], ["--lora"]])   # LoRA has dropout: the RNG must resume exactly too
def test_resume_matches_uninterrupted(tmp_path, monkeypatch, extra):
    common = ["--steps", "6", "--batch-size", "4", "--save-every", "3"] + extra
    full, log_full = run(tmp_path, "full", *common)
    # an interrupted run: crash while building batch 5 (after the step-3 checkpoint), then --resume
    crash_at_batch(monkeypatch, 5, lambda: run(tmp_path, "part", *common))
    assert (tmp_path / "part" / "latest").read_text() == "checkpoint-0000003"
    resumed, log_res = run(tmp_path, "part", *common, "--resume")
    losses_full = [r["loss"] for r in log_full]
    losses_res = [r["loss"] for r in log_res[-3:]]  # the log also holds the crashed run's steps 1-4
    assert [r["step"] for r in log_res] == [1, 2, 3, 4, 4, 5, 6]
    marked = [json.loads(x) for x in (tmp_path / "part.jsonl").read_text().splitlines()]   # issue 32 #18
    assert [r.get("step", r.get("resumed_at_step")) for r in marked] == [1, 2, 3, 4, 3, 4, 5, 6]
    assert "steps after 3 above this line" in marked[4]["note"]
    assert losses_res == pytest.approx(losses_full[3:], abs=1e-5)
    a, b = load_file(os.path.join(full, "model.safetensors")), load_file(os.path.join(resumed, "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_resume_falls_back_past_a_broken_checkpoint(tmp_path, capsys):
    """`latest` naming a missing or truncated checkpoint: resume from the newest complete one (and
    say so); pruning never removes what `latest` names or anything newer."""
    common = ["--steps", "6", "--batch-size", "4", "--save-every", "2", "--keep", "3"]
    run(tmp_path, "r", *common)
    out = tmp_path / "r"
    assert sorted(os.listdir(out)) == ["checkpoint-0000002", "checkpoint-0000004", "checkpoint-0000006", "latest"]
    opt = out / "checkpoint-0000006" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])                          # truncated by a full disk, say
    _, log = run(tmp_path, "r", *common, "--resume")
    assert "names checkpoint-0000006: optimizer.safetensors is" in capsys.readouterr().out
    assert [r["step"] for r in log][-2:] == [5, 6]                   # continued from step 4
    assert (out / "latest").read_text() == "checkpoint-0000006"
    import shutil
    shutil.rmtree(out / "checkpoint-0000006")                        # deleted by the user
    _, log = run(tmp_path, "r", *common, "--resume")
    assert "latest names checkpoint-0000006: " in capsys.readouterr().out
    assert [r["step"] for r in log][-2:] == [5, 6]
    assert sorted(os.listdir(out)) == ["checkpoint-0000002", "checkpoint-0000004", "checkpoint-0000006", "latest"]
    # no complete checkpoint at all: a clear stop, not a silent fresh start
    for d in ("checkpoint-0000002", "checkpoint-0000004", "checkpoint-0000006"):
        (out / d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in .*config.json is missing"):
        run(tmp_path, "r", *common, "--resume")


def test_prune_keeps_latest_and_newer(tmp_path):
    for s in range(1, 6):
        (tmp_path / f"checkpoint-{s:07d}").mkdir()
    (tmp_path / "latest").write_text("checkpoint-0000003")
    train.checkpoints.prune_checkpoints(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-0000002", "checkpoint-0000003", "checkpoint-0000004",
                                            "checkpoint-0000005", "latest"]


def test_resume_refuses_changed_settings(tmp_path):
    common = ["--steps", "4", "--batch-size", "4", "--save-every", "2"]
    run(tmp_path, "r", *common)
    for extra, said in ((["--lr", "1e-3"], "--lr 0.003 -> 0.001"), (["--batch-size", "8"], "--batch-size 4 -> 8"),
                        (["--query-tokens", "2"], "--query-tokens 4 -> 2"), (["--seed", "1"], "--seed 0 -> 1"),
                        (["--backbone", "Qwen/Qwen2-VL-2B-Instruct"], "--backbone 'tiny' -> 'Qwen/Qwen2-VL-2B-Instruct'"),
                        (["--data", "colpali-train"], "--data 'synthetic' -> 'colpali-train'"),
                        (["--synthetic-size", "300"], "--synthetic-size 400 -> 300"),
                        (["--max-pixels", "12544"], "--max-pixels None -> 12544"),
                        (["--min-pixels", "1568"], "--min-pixels None -> 1568")):
        with pytest.raises(ValueError, match=f"other settings than it was trained with .*{re.escape(said)}"):
            run(tmp_path, "r", *common, *extra, "--resume")
    # another number of processes (torchrun --nproc_per_node 2): the data order would change
    settings = {**vars(train.get_args(SMALL + ["--out", str(tmp_path / "r"), "--log-file", str(tmp_path / "r.jsonl"),
                                             *common, "--resume"])), "world_size": 2}
    with pytest.raises(ValueError, match="other settings than it was trained with .*processes 1 -> 2"):
        checkpoints.check_resume(settings, str(tmp_path / "r" / "checkpoint-0000004"))
    # what may change does, and is what the next checkpoint records
    import shutil
    shutil.rmtree(tmp_path / "r" / "checkpoint-0000004")         # back to step 2, then steps 3-4 again
    run(tmp_path, "r", *common, "--save-every", "1", "--keep", "5", "--resume")
    assert (tmp_path / "r" / "checkpoint-0000003").is_dir()
    used = json.loads((tmp_path / "r" / "checkpoint-0000004" / "train_args.json").read_text())
    assert used["save_every"] == 1 and used["keep"] == 5 and used["world_size"] == 1 and used["lr"] == 3e-3


def test_bad_flags_stop_before_training(tmp_path, capsys):
    for argv, said in ((["--save-every", "0"], "--save-every must be at least 1"),
                       (["--query-tokens", "0"], "--query-tokens must be at least 1"),
                       (["--objects", "3"], "--objects must be two integers"),
                       (["--objects", "0,12"], "--objects 0,12: need 1 <= min <= max <= 9"),
                       (["--temperature", "0"], "--temperature must be a positive number"),
                       (["--lr", "nan"], "--lr must be a positive number")):
        with pytest.raises(SystemExit):
            train.get_args(argv)
        assert said in capsys.readouterr().err, argv
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"^train.py: error: cannot write --out .*file/out"):
        train.main(SMALL + ["--out", str(tmp_path / "file" / "out"), "--steps", "1"])
    for log in (tmp_path / "no-such-folder" / "log.jsonl", tmp_path):       # no folder for it; a folder
        with pytest.raises(SystemExit, match=rf"^train.py: error: cannot write --log-file {re.escape(str(log))}"):
            train.main(SMALL + ["--out", str(tmp_path / "o2"), "--steps", "1", "--log-file", str(log)])
    assert not (tmp_path / "o2" / "latest").exists()                       # refused before any training
    with pytest.raises(SystemExit, match=r"^train.py: error: unknown backbone 'qwen-vl-9000': not an alias \(tiny, tiny-qwen3-vl, tiny-qwen3.5, qwen2-vl-2b"):
        train.main(SMALL + ["--backbone", "qwen-vl-9000", "--out", str(tmp_path / "o"), "--steps", "1"])


def test_sigterm_says_where_to_resume(tmp_path):
    import signal
    import time
    out = tmp_path / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    p = subprocess.Popen([sys.executable, "train.py", *SMALL, "--steps", "500", "--batch-size", "2", "--save-every", "2",
                          "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "latest").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert "train.py: stopped during step" in err and "is complete: run the same command with --resume" in err
    assert "Traceback" not in err


def test_grad_cache_gradients_equal_the_full_batch():
    """GradCache in chunks of 3 rows: the same loss and parameter gradients as one big batch
    (fp32), with hard negatives and images on both sides."""
    from functools import partial

    import data
    from metaembed import MetaEmbed
    model = MetaEmbed.from_backbone("tiny", num_query_tokens=4, num_candidate_tokens=8, groups=((1, 1), (4, 8)))
    ds = data.SyntheticPairs(8)
    q_in, c_in, neg_mask = data.collate([ds[i] for i in range(8)], model.processor)
    assert c_in["pixel_values"] is not None and q_in.get("pixel_values") is not None

    def grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def full():
        q, c = model(q_in, c_in)
        loss, _ = train.mmr_loss(model.config, q, c, neg_mask, 0)
        loss.backward()
        return loss.detach()
    cached = partial(train.train_step, model, model, (q_in, c_in, neg_mask), 0, 3)
    l1, g1 = grads(full)
    (l2, _), g2 = grads(cached)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=0)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for k in g1:   # relative to the gradient's norm: chunks sum in another order (float rounding)
        assert (g2[k] - g1[k]).norm() <= 1e-5 * g1[k].norm() + 1e-9, (k, (g2[k] - g1[k]).norm(), g1[k].norm())


def test_rows_of_splits_images_with_their_rows():
    import data
    from metaembed import MetaEmbed
    model = MetaEmbed.from_backbone("tiny")
    ds = data.SyntheticPairs(6)
    _, c_in, _ = data.collate([ds[i] for i in range(6)], model.processor)     # 6 positives + 6 negatives
    img = model.backbone.config.image_token_id
    parts = [train.rows_of(c_in, lo, min(lo + 5, 12), img) for lo in range(0, 12, 5)]
    assert sum(p["input_ids"].shape[0] for p in parts) == 12
    assert torch.equal(torch.cat([p["pixel_values"] for p in parts if "pixel_values" in p]), c_in["pixel_values"])
    assert torch.equal(torch.cat([p["image_grid_thw"] for p in parts if "image_grid_thw" in p]), c_in["image_grid_thw"])


def test_mixture_training_logs_sources_and_heldout_and_resumes_exactly(tmp_path, monkeypatch):
    """--mixture with K = 2 negatives and --eval-every: the log has the examples seen per source and
    held-out P@1 per group; a crashed run resumed from its checkpoint repeats the same batches."""
    import yaml
    from test_data import moca_copy
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"A": {"weight": 1.0, "path": moca_copy(tmp_path, "A", 60)},
                                   "B": {"weight": 3.0, "path": moca_copy(tmp_path, "B", 60)}}))
    common = ["--mixture", str(mix), "--holdout", "8", "--source-run", "3", "--num-negatives", "2",
              "--steps", "4", "--batch-size", "4", "--save-every", "2", "--eval-every", "2"]
    path, log = run(tmp_path, "full", *common)
    # the examples seen per source are those of the mixture's order (seed 0, one rank, runs of 3)
    order = hub.load_mixture(str(mix), holdout=8, seed=0)
    src = train.data.MixtureBatches(order, train.data.Order(4, 1, 0, 0, 0, 4), 3).examples(range(600))[0]
    assert [r["seen"] for r in log] == [{"A": int((src[:n] == 0).sum()), "B": int((src[:n] == 1).sum())}
                                        for n in (4, 8, 12, 16)]
    # weights 1 : 3, drawn with replacement: B's share 0.75 over 600 examples (200 runs), within 0.1
    assert abs((src == 1).mean() - 0.75) < 0.1
    # the log counts this step's queries that have a hard negative (moca_copy: row i has i % 3 of them)
    assert [r["hard_negatives"] for r in log] == [
        sum(bool(order[(int(k), int(i))]["negs"]) for k, i in zip(*train.data.MixtureBatches(
            order, train.data.Order(4, 1, 0, 0, 0, 4), 3).examples(range(4 * s, 4 * s + 4)))) for s in range(4)]
    # held-out P@1 at step 4, recomputed from the saved model: each source's 8 held-out queries
    # against its 8 positives, the argmax of the prefix MaxSim (then the mean over the two sources)
    from maxsim import maxsim_reference
    from metaembed import MetaEmbed
    model = MetaEmbed.from_pretrained(path)
    want = {}
    for held in order.heldout:
        rows = [held[i] for i in range(len(held))]
        q = model.encode_queries([r["qry_text"] for r in rows], [r["qry_image"] for r in rows])
        c = model.encode_candidates([r["pos_text"] for r in rows], [r["pos_image"] for r in rows])
        for rq, rc in model.config.groups:
            hits = (maxsim_reference(q[:, :rq], c[:, :rc]).argmax(1) == torch.arange(len(rows))).float().mean()
            want[f"heldout_p1_{rq}x{rc}"] = want.get(f"heldout_p1_{rq}x{rc}", 0.0) + hits.item() / 2
    assert {k: log[3][k] for k in want} == pytest.approx(want, abs=1e-9) and "heldout_p1_1x1" in log[1]
    assert "heldout_p1_1x1" not in log[0]
    crash_at_batch(monkeypatch, 4, lambda: run(tmp_path, "part", *common))
    _, log_res = run(tmp_path, "part", *common, "--resume")
    assert [r["step"] for r in log_res][-2:] == [3, 4]
    assert [r["loss"] for r in log_res[-2:]] == pytest.approx([r["loss"] for r in log[2:]], abs=1e-5)
    assert log_res[-1]["seen"] == log[-1]["seen"]


def test_recipe_paper_sets_the_official_settings(capsys):
    args = train.get_args(["--recipe", "paper", "--lr", "2e-4"])
    assert (args.backbone, args.batch_size, args.steps, args.warmup, args.lr) == ("qwen2.5-vl-7b", 48, 4000, 500, 2e-4)
    assert (args.lora, args.num_negatives, args.source_run, args.holdout, args.shuffle_buffer) == (True, 1, 32, 100, 1000)
    assert (args.max_visual_tokens, args.max_pixels) == (1024, None)     # pixels follow from the family
    assert args.query_suffix and args.grad_checkpointing and args.proj_dim == 0
    said = capsys.readouterr().out
    assert "--recipe paper: --backbone qwen2.5-vl-7b" in said and "(given: lr)" in said
    # the shipped mixture: the official file's 26 weights and caps, every source a config of MoCa's data
    import yaml
    spec = yaml.safe_load(open(args.mixture))
    official = dict(HatefulMemes=(0.5, 10000), **{"OK-VQA": (0.5, 10000)}, SUN397=(0.5, 10000), VOC2007=(0.5, 10000),
                    **{"A-OKVQA": (1.0, 50000)}, CIRR=(1.0, 50000), ChartQA=(1.0, 50000), DocVQA=(1.0, 50000),
                    InfographicsVQA=(1.0, 50000), N24News=(1.0, 50000), NIGHTS=(0.5, 50000), VisDial=(1.0, 50000),
                    Visual7W=(1.0, 50000), WebQA=(1.0, 50000), ImageNet_1K=(1.0, 100000), MSCOCO=(2.0, 100000),
                    MSCOCO_i2t=(1.0, 100000), MSCOCO_t2i=(1.0, 100000), VisualNews_i2t=(1.0, 100000),
                    VisualNews_t2i=(1.0, 100000), ArxivQA=(1.0, 50000), InfoSeek_it2it=(1.0, 50000),
                    InfoSeek_it2t=(1.0, 50000), **{"TAT-DQA": (1.0, 50000)}, tevatron_colpali=(5.0, 999999),
                    visrag_ind=(5.0, 999999))
    assert {n: (e["weight"], e["num_samples"]) for n, e in spec.items()} == official
    assert {e["path"] for e in spec.values()} == {"./data_dir/MoCa_train_with_image"}
    # without the data: one line naming every source, before anything else
    with pytest.raises(ValueError, match=r"26 of 26 source\(s\) cannot be read: ImageNet_1K, N24News, .*visrag_ind: "
                                         r"the folder './data_dir/MoCa_train_with_image' does not exist"):
        hub.load_mixture(args.mixture)


def test_a_real_backbone_offline_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    """The design card's `python train.py --backbone qwen2-vl-2b` on a machine with no hub: a default
    --out (out/<backbone>-<data>), said at the start, and one line naming the model id and how to point
    --backbone at a local folder, before anything is written."""
    monkeypatch.chdir(tmp_path)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--backbone", "qwen2-vl-2b"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "checkpoints go to out/qwen2-vl-2b-synthetic" in r.stdout
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Qwen/Qwen2-VL-2B-Instruct" in err[0] and "--backbone DIR" in err[0], err
    assert not (tmp_path / "out").exists()


def test_default_out_names_backbone_and_data():
    assert train.get_args(["--backbone", "Qwen/Qwen2-VL-2B-Instruct", "--data", "colpali-train"]).out == \
        os.path.join("out", "Qwen2-VL-2B-Instruct-colpali-train")
    assert train.get_args(["--backbone", "/models/q2b/", "--mixture", "mixtures/paper.yaml"]).out == \
        os.path.join("out", "q2b-paper")
    assert train.get_args([]).out == "out/tiny-synthetic"


def test_recipe_paper_caps_images_at_1024_tokens_in_the_familys_pixels():
    """A visual token is 32 x 32 pixels on Qwen3-VL: the cap is 1024 of them (1,048,576 pixels), not
    1024 x 28 x 28. A 2000 x 3000 page gets more than 1,000 and at most 1,024 visual tokens."""
    from PIL import Image
    args = train.get_args(["--recipe", "paper", "--backbone", "tiny-qwen3-vl"])
    model = train.build_model(args, None)
    assert model.config.max_visual_tokens == 1024 and model.config.max_pixels == 1024 * 32 * 32
    inputs = model.prepare([""], [Image.new("RGB", (2000, 3000), "white")], "candidate")
    tokens = int((inputs["input_ids"] == model.backbone.config.image_token_id).sum())
    assert 1000 < tokens <= 1024, tokens
    assert train.get_args(["--recipe", "paper", "--max-pixels", "50176"]).max_pixels == 50176   # pixels given win


def test_mixture_sources_are_checked_before_the_backbone_and_negatives_said_once(tmp_path, monkeypatch, capsys):
    """Every source opened before the backbone is built (one line naming each that cannot be read); a
    source without hard negatives is said once at the start; --require-negatives refuses to start."""
    import yaml
    from test_data import moca_official_copy
    repo = moca_official_copy(tmp_path, n=12)
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({n: {"weight": 1.0, "path": repo} for n in ("CIRR", "DocVQA", "N24News")}))
    built = []
    monkeypatch.setattr(train.MetaEmbed, "from_backbone", classmethod(lambda cls, *a, **k: built.append(1) or 1 / 0))
    common = ["--mixture", str(mix), "--holdout", "2", "--steps", "2", "--batch-size", "4", "--no-progress"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"CIRR": {"path": repo}, "X": {"path": str(tmp_path / "gone")}, "ArxivQA": {}}))
    with pytest.raises(ValueError, match=r"2 of 3 source\(s\) cannot be read: .*ArxivQA: no path") as e:
        train.train(train.get_args(SMALL + ["--out", str(tmp_path / "a")] + common[:1] + [str(bad)] + common[2:]))
    assert "X: the folder" in str(e.value) and "CIRR" not in str(e.value)
    with pytest.raises(ValueError, match=r"--require-negatives: .*N24News \(0 of 10 rows\)"):
        train.train(train.get_args(SMALL + ["--out", str(tmp_path / "b"), "--require-negatives"] + common))
    assert not built and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    said = capsys.readouterr().out
    assert said.count("N24News: no hard negatives in this copy: in-batch negatives only") == 1
    assert "CIRR: no hard" not in said and "DocVQA: no hard" not in said


def test_resume_refuses_a_changed_mixture_naming_the_source(tmp_path, monkeypatch):
    """#41 case 4: the mixture file edited between the stop and --resume (two sources' paths swapped, a
    weight changed) is refused, naming each source and what changed; the same rows copied elsewhere
    (a path that moved) resume."""
    import yaml
    from test_data import moca_copy
    a, b = moca_copy(tmp_path, "A", 40), moca_copy(tmp_path, "B", 30)
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"A": {"weight": 1.0, "path": a}, "B": {"weight": 3.0, "path": b}}))
    common = ["--mixture", str(mix), "--holdout", "4", "--source-run", "2", "--steps", "4", "--batch-size", "4",
              "--save-every", "2"]
    crash_at_batch(monkeypatch, 4, lambda: run(tmp_path, "r", *common))       # stopped after the step-2 checkpoint
    mix.write_text(yaml.safe_dump({"A": {"weight": 2.0, "path": b}, "B": {"weight": 3.0, "path": a}}))
    with pytest.raises(ValueError, match=r"--resume from .* on other data than it was trained on") as e:
        run(tmp_path, "r", *common, "--resume")
    said = str(e.value)
    assert "A: weight 1.0 -> 2.0" in said and "A: its rows differ (40 of 40 rows -> 30 of 30 rows" in said
    assert "B: its rows differ (30 of 30 rows -> 40 of 40 rows" in said and "B: weight" not in said
    moved = shutil.copytree(a, tmp_path / "elsewhere")
    mix.write_text(yaml.safe_dump({"A": {"weight": 1.0, "path": str(moved)}, "B": {"weight": 3.0, "path": b}}))
    _, log = run(tmp_path, "r", *common, "--resume")
    assert [r["step"] for r in log][-2:] == [3, 4]
    saved = json.load(open(tmp_path / "r" / "checkpoint-0000004" / "train_args.json"))["trained_on"]
    assert saved["sources"]["A"]["path"] == str(moved) and list(saved["sources"]) == ["A", "B"]


def test_a_row_with_a_corrupt_image_is_one_line_or_skipped_and_counted(tmp_path, capsys):
    """#41 case 8: a MoCa-layout row whose qry_image bytes are b"garbage" was a PIL traceback from deep inside
    (build_data for a held-out row, the first step for a training row); now one line naming the source and
    the row, and --skip-bad-rows skips it (the next good row in its place, the same every time), counted."""
    import io

    import datasets
    import yaml
    from conftest import write_hub_repo
    from PIL import Image

    def png(i):
        out = io.BytesIO()
        Image.new("RGB", (32, 32), (10 * i, 0, 0)).save(out, "PNG")
        return {"bytes": out.getvalue(), "path": None}

    def copy(name, bad):
        feats = datasets.Features({"qry": datasets.Value("string"), "qry_image": datasets.Image(),
                                   "pos_text": datasets.Value("string")})
        rows = [dict(qry=f"q{i}", qry_image={"bytes": b"garbage", "path": None} if i in bad else png(i),
                     pos_text=f"doc {i}") for i in range(20)]
        return write_hub_repo(tmp_path / name, {"default": {"original": rows}}, features=feats)
    mix = tmp_path / "mix.yaml"
    common = ["--mixture", str(mix), "--holdout", "4", "--steps", "4", "--batch-size", "4", "--save-every", "4",
              "--source-run", "4"]
    mix.write_text(yaml.safe_dump({"A": {"path": copy("held", {18})}}))            # a held-out row
    with pytest.raises(SystemExit, match=r"^train.py: error: A row 18: an image in the row cannot be decoded "
                                         r"\(not an image PIL can identify\): repair or drop the row, or pass "
                                         r"--skip-bad-rows to skip such rows$"):
        train.main(SMALL + ["--out", str(tmp_path / "h")] + common)
    mix.write_text(yaml.safe_dump({"A": {"path": copy("train", {5, 6})}}))          # training rows
    with pytest.raises(SystemExit, match=r"^train.py: error: A row [56]: an image in the row cannot be decoded"):
        train.main(SMALL + ["--out", str(tmp_path / "t")] + common)
    source = hub.load_mixture(str(mix), holdout=4, skip_bad_rows=True).sources[0]
    assert source[5]["qry_text"] == source[6]["qry_text"] == "q7" and len(source[5]["skipped"]) == 2
    assert source[6]["skipped"] == [source[5]["skipped"][1]] and source[4]["skipped"] == []
    _, log = run(tmp_path, "s", *common, "--skip-bad-rows")
    assert sum(r["skipped_rows"] for r in log) == 3                               # row 5's two, row 6's one
    assert capsys.readouterr().err.count("skipped A row") == 3
