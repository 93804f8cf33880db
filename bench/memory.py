"""Memory: evaluation at the paper's scale, GradCache, full-size rehearsals with random weights, and the
official recipe's memory per device by arithmetic from the rehearsals' measured ratios."""
import json
import os
import time

import torch

from bench.common import _status, cpu_name, rss_peak_reset, write_json



def eval_memory(n, index_dir=None, D=3584, queries=2):
    """Encode and score n candidates at (16, 64), D = 3584, through evaluate.score_retrieval with a
    stub encoder (the tiny backbone's processor; `embed` returns float32 unit vectors of size D, as
    a 7B backbone would), a bf16 index in memory or on disk. -> dict of bytes."""
    import tempfile

    import evaluate
    from metaembed import MetaEmbed
    model = MetaEmbed.from_backbone("tiny")
    model.dim = D
    sample = torch.nn.functional.normalize(torch.randn(64, 64, D), dim=-1)

    def embed(inputs, side):                       # (B, R, D) float32, a fresh tensor each batch
        B, R = inputs["input_ids"].shape[0], 16 if side == "query" else 64
        return sample[:B, :R].clone()
    model.embed = embed
    task = dict(queries={f"q{i}": (f"query {i}", None) for i in range(queries)},
                corpus={f"d{i}": (f"document {i}", None) for i in range(n)},
                qrels={f"q{i}": {f"d{i}": 1} for i in range(queries)})
    index_bytes = n * 64 * D * torch.bfloat16.itemsize
    base = rss_peak_reset()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=index_dir) as tmp:
        path = os.path.join(tmp, "corpus") if index_dir else None
        evaluate.score_retrieval(model, task, [(1, 1), (16, 64)], evaluate.ScoringOptions(64, progress=True, index_path=path))
    peak = _status("VmHWM") - base
    return dict(candidates=n, D=D, on_disk=bool(index_dir), index_bytes=index_bytes, peak_extra_bytes=peak,
                ratio=peak / index_bytes, seconds=time.perf_counter() - t)


def grad_cache_step_memory(batch, chunk, image_px=448):
    """Peak host memory beyond the model of one training step (forward + backward, tiny backbone,
    text queries against image candidates of image_px^2 pixels, one hard negative each), plain
    (chunk 0) or with GradCache in chunks of `chunk` rows."""
    from PIL import Image

    import data
    import train
    from metaembed import MetaEmbed
    model = MetaEmbed.from_backbone("tiny", max_pixels=image_px * image_px)
    g = torch.Generator().manual_seed(0)
    pics = [Image.fromarray(torch.randint(0, 255, (image_px, image_px, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(2 * batch)]
    rows = [dict(qry_text=f"query {i}", qry_image=None, pos_text="", pos_image=pics[i], negs=[("", pics[batch + i])],
                 source=f"row {i}") for i in range(batch)]
    q_in, c_in, neg_mask = data.collate(rows, model.processor)
    tokens = int(c_in["image_grid_thw"][0].prod()) // 4
    base = rss_peak_reset()
    t = time.perf_counter()
    if chunk:
        loss, _ = train.train_step(model, model, (q_in, c_in, neg_mask), 0, chunk)
    else:
        q, c = model(q_in, c_in)
        loss, _ = train.mmr_loss(model.config, q, c, neg_mask, 0)
        loss.backward()
    # the whole process's peak: the step's own increase can hide in memory freed by the collate
    return dict(batch=batch, chunk=chunk, visual_tokens_per_image=tokens, loss=loss.item(), rss_before_bytes=base,
                peak_bytes=_status("VmHWM"), seconds=time.perf_counter() - t)


# Full-size configs (random weights): the numbers of each model's config.json on the hub, as copied
# in public code. Each is checked by its parameter count
# against the hub's safetensors total (`published`): a wrong width or depth would not match.
REHEARSAL_CONFIGS = {
    # Qwen/Qwen2-VL-2B-Instruct: 2,208,985,600 parameters
    "qwen2-vl-2b": dict(family="qwen2_vl", published=2_208_985_600, text=dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
        vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2)),
    # Qwen/Qwen2.5-VL-3B-Instruct, the paper's smallest: windowed vision attention, 4 full blocks
    "qwen2.5-vl-3b": dict(family="qwen2_5_vl", published=3_754_622_976, text=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, max_position_embeddings=128000, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")),
    # Qwen/Qwen3-VL-2B-Instruct: 2,127,532,032 (the text MLP is 6,144 wide; 5,632 and 8,192, also
    # seen in third-party code, give 2,039M and 2,480M)
    "qwen3-vl-2b": dict(family="qwen3_vl", published=2_127_532_032, text=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20], mrope_interleaved=True)),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh")),
    # Qwen/Qwen3.5-2B: 2,274,069,824 on the hub, of which 60,828,160 are the multi-token-prediction
    # layer that transformers does not build: 2,213,241,664. Gated DeltaNet in 3 of every 4 layers.
    "qwen3.5-2b": dict(family="qwen3_5", published=2_213_241_664, text=dict(
        vocab_size=248320, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=8,
        num_key_value_heads=2, head_dim=256, max_position_embeddings=262144, tie_word_embeddings=True,
        attn_output_gate=True, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 6,
        linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                                       mrope_section=[11, 11, 10], mrope_interleaved=True)),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    hidden_act="gelu_pytorch_tanh")),
}


def head_dim(text):
    return text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]


def layer_parameters(text, family):
    """One Qwen2 / Qwen3 decoder layer: q, k, v, o, the MLP, two norms; Qwen2's q, k, v biases or
    Qwen3's QK-norms."""
    H, I, hd = text["hidden_size"], text["intermediate_size"], head_dim(text)
    q, kv = text["num_attention_heads"] * hd, text["num_key_value_heads"] * hd
    return 2 * H * q + 2 * H * kv + 3 * H * I + 2 * H + (2 * hd if family == "qwen3_vl" else q + 2 * kv)


def trained_parameters(text, lora_r=32, meta_tokens=80):
    """LoRA r on q, k, v, o, gate, up, down of every layer (r x (in + out) each), + the Meta Tokens."""
    H, I, hd = text["hidden_size"], text["intermediate_size"], head_dim(text)
    q, kv = text["num_attention_heads"] * hd, text["num_key_value_heads"] * hd
    return lora_r * text["num_hidden_layers"] * (2 * (H + q) + 2 * (H + kv) + 3 * (H + I)) + meta_tokens * H


def layer_bytes_per_token(text, family):
    """What autograd keeps for one Qwen2 / Qwen3 decoder layer per token without checkpointing,
    bf16 weights and float32 LoRA with dropout: 14 H-wide float32 tensors (RMSNorm inputs, the LoRA
    inputs cast to float32 and their dropout), 3 bf16 and 2 float32 I-wide ones (the MLP), q, k, v
    and the attention output in bf16, and Qwen3's QK-norm inputs in float32. Counted from the saved
    tensors of Qwen2-VL-2B and Qwen3-VL-2B (both within 0.5%). None for Qwen3.5, whose Gated
    DeltaNet layers keep what their kernel keeps (the PyTorch reference here: 1.8x a full layer)."""
    if family == "qwen3_5":
        return None
    H, I, hd = text["hidden_size"], text["intermediate_size"], head_dim(text)
    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    return 56 * H + 14 * I + 4 * hd * (heads + kv) * (2 if family == "qwen3_vl" else 1)


# The models of the per-device memory table (python -m bench --memory-table): the rehearsed ones
# by name, the paper's larger two by their language model's config.json and the hub's total.
MEMORY_MODELS = {
    "Qwen2-VL-2B": "qwen2-vl-2b", "Qwen3-VL-2B": "qwen3-vl-2b", "Qwen2.5-VL-3B": "qwen2.5-vl-3b",
    "Qwen2.5-VL-7B": dict(family="qwen2_5_vl", published=8_292_166_656, text=dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, tie_word_embeddings=False)),
    "Qwen2.5-VL-32B": dict(family="qwen2_5_vl", published=33_452_718_336, text=dict(
        vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
        num_key_value_heads=8, tie_word_embeddings=False)),
}


def memory_table(measured, query_tokens, candidate_tokens=1116, batch=48, negatives=1, chunk=None, fsdp=1):
    """Per-device GiB of one training step. weights: bf16, without an untied lm_head (the base model
    is loaded, not the LM head); with FSDP2 the decoder layers sharded, the root (vision tower,
    embeddings) whole, two layers gathered (this one, the next prefetched). trained: LoRA r = 32 +
    Meta Tokens in float32 with the gradient and AdamW's two moments, 16 bytes each, sharded with
    FSDP. kept: every row's checkpointed hidden state at every layer (the rehearsals' bytes per
    token per layer). transient, the larger of: one layer recomputed in backward for the rows of
    one forward (layer_bytes_per_token x the rehearsals' measured ratio), or the frozen vision
    tower's forward over the candidate images (the rehearsals' bytes per patch, 4,096 patches an
    image at 1,024 visual tokens) while only the query rows' checkpoints are kept. Rows are
    query_tokens / candidate_tokens long (1,024 visual tokens, the prompt, the 16 / 80 Meta
    Tokens). chunk: GradCache, at most `chunk` rows with a graph at a time. `measured`: the
    results of bench/ --rehearse."""
    kept = max(r["kept_bytes_per_token_per_layer"] / r["hidden_size"] for r in measured)        # x H
    recompute = max(r["recompute_bytes_per_token"] / r["layer_bytes_per_token"] for r in measured
                    if r.get("layer_bytes_per_token"))
    vision = max(r["vision_peak_per_patch_KiB"] for r in measured) * 2**10
    rows_q, rows_c = batch, batch * (1 + negatives)
    if chunk:   # one chunk's graph at a time, of whichever rows are longer
        rows_q, rows_c = 0, chunk
        candidate_tokens = max(candidate_tokens, query_tokens)
    table = []
    for name, spec in MEMORY_MODELS.items():
        spec = REHEARSAL_CONFIGS[spec] if isinstance(spec, str) else spec
        text, family = spec["text"], spec["family"]
        H, L = text["hidden_size"], text["num_hidden_layers"]
        base = spec["published"] - (0 if text["tie_word_embeddings"] else text["vocab_size"] * H)
        layers = L * layer_parameters(text, family)
        weights = base if fsdp == 1 else layers / fsdp + (base - layers) + 2 * layer_parameters(text, family)
        kept_q, kept_c = rows_q * query_tokens * L * kept * H, rows_c * candidate_tokens * L * kept * H
        layer = max(rows_q * query_tokens, rows_c * candidate_tokens) * layer_bytes_per_token(text, family) * recompute
        tower = rows_c * 4096 * vision
        row = dict(model=name, weights=2 * weights, trained=16 * trained_parameters(text) / fsdp,
                   kept=kept_q + kept_c, transient=max(layer, tower - kept_c))
        row["total"] = row["weights"] + row["trained"] + row["kept"] + row["transient"]
        row = {k: v / 2**30 if k != "model" else v for k, v in row.items()}
        row["transient_is"] = "vision tower" if tower - kept_c > layer else "layer recompute"
        table.append(row)
    return dict(batch=batch, negatives=negatives, query_tokens=query_tokens, candidate_tokens=candidate_tokens,
                chunk=chunk, fsdp=fsdp, kept_x_hidden=kept, recompute_ratio=recompute, vision_KiB_per_patch=vision / 2**10,
                rows=table)


def save_full_size(name, path, dtype):
    """REHEARSAL_CONFIGS[name] with random weights, saved as its hub repo is laid out (the tiny
    tokenizer's special-token ids in the config)."""
    import transformers

    from machinery import backbones
    spec = REHEARSAL_CONFIGS[name]
    tokenizer = backbones.tiny_tokenizer(backbones.TINY["vocab_size"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in backbones.SPECIAL_TOKENS}
    config = getattr(transformers, backbones.FAMILIES[spec["family"]].model.replace("Model", "Config"))(
        text_config=spec["text"], vision_config=spec["vision"], tie_word_embeddings=spec["text"]["tie_word_embeddings"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    backbones.save_hub_layout(config, tokenizer, path, dtype)



class AnonPeak:
    """Peak anonymous memory (RssAnon: tensors, not the safetensors files that transformers maps
    and pages in as they are read) while the block runs, sampled every 2 ms. glibc is told, for the
    rest of the process, to give blocks from 64 KiB up back when they are freed, so RssAnon follows
    the live tensors."""

    def __enter__(self):
        import ctypes
        import threading
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)   # M_MMAP_THRESHOLD: 64 KiB
        except (OSError, AttributeError):
            pass
        self.start = self.peak = _status("RssAnon")
        self.done = threading.Event()
        def sample():
            while not self.done.wait(0.002):
                self.peak = max(self.peak, _status("RssAnon"))
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.end = _status("RssAnon")
        self.peak = max(self.peak, self.end)


def kept_for_backward(fn, model):
    """-> (fn(), bytes that autograd keeps for backward when fn returns: the unique storages saved
    in the graph and still alive, the model's own parameters not counted)."""
    import weakref
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}
    def pack(x):
        s = x.untyped_storage()
        if s.data_ptr() not in params:
            saved.setdefault(s.data_ptr(), []).append((weakref.ref(x), s.nbytes()))
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return out, sum(refs[0][1] for refs in saved.values() if any(r() is not None for r, _ in refs))


def rehearse(name, dtype=torch.bfloat16):
    """A full-size backbone with random weights, on this CPU: encode a 2000 x 3000 page and a query,
    one LoRA step with gradient checkpointing on 1 query + its page + 1 hard-negative page, save and
    reload the checkpoint (the base from a local hub-layout folder). -> times, parameters, and the
    step's memory: what autograd keeps per row, the forward and backward peaks above the start."""
    import tempfile

    from PIL import Image

    import data
    import train
    from machinery import backbones
    from metaembed import MetaEmbed
    spec = REHEARSAL_CONFIGS[name]
    out, t0 = {"name": name, "dtype": str(dtype).removeprefix("torch."), "cpu": cpu_name()}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        save_full_size(name, f"{tmp}/base", dtype)
        out["build_s"] = time.perf_counter() - t0
        model = MetaEmbed.from_backbone(f"{tmp}/base", dtype=out["dtype"])
        out["parameters"] = sum(p.numel() for p in model.parameters())
        out["trained_parameters"] = sum(p.numel() for p in model.trained_parameters().values())
        out["base_parameters"] = sum(p.numel() for n, p in model.backbone.named_parameters() if "lora_" not in n)
        out["published_parameters"] = spec["published"]
        out["weights_GiB"] = sum(p.numel() * p.element_size() for p in model.backbone.parameters()) / 2**30
        page = Image.fromarray(torch.randint(0, 255, (3000, 2000, 3), dtype=torch.uint8).numpy())
        neg = Image.fromarray(torch.randint(0, 255, (3000, 2000, 3), dtype=torch.uint8).numpy())
        t = time.perf_counter()
        model.encode_candidates([""], [page])
        out["encode_page_s"], out["visual_tokens"] = time.perf_counter() - t, int(
            (model.prepare([""], [page], "candidate")["input_ids"] == model.backbone.config.image_token_id).sum())
        t = time.perf_counter()
        model.encode_queries(["a query about the page"])
        out["encode_query_s"] = time.perf_counter() - t
        backbones.checkpoint_activations(model.backbone)
        model.train()
        rows = [dict(qry_text="a query about the page", qry_image=None, pos_text="", pos_image=page,
                     negs=[("", neg)], source="rehearsal")]
        q_in, c_in, neg_mask = data.collate(rows, model.processor, query_suffix=True)
        R = model.config.num_query_tokens + model.config.num_candidate_tokens
        pages, out["page_row_tokens"] = c_in["input_ids"].shape[0], c_in["input_ids"].shape[1] + R
        t = time.perf_counter()
        with AnonPeak() as fwd:
            (q, _), kept_q = kept_for_backward(lambda: model(q_in, None), model)
            (_, cand), kept_c = kept_for_backward(lambda: model(None, c_in), model)
            loss, _ = train.mmr_loss(model.config, q, cand, neg_mask, 0)
        with AnonPeak() as bwd:
            loss.backward()
        out["train_step_s"], out["loss"] = time.perf_counter() - t, loss.item()
        out["kept_query_row_MiB"], out["kept_page_row_MiB"] = kept_q / 2**20, kept_c / pages / 2**20
        # a checkpointed layer keeps its input hidden state: tokens x H x 2 bytes (bf16)
        out["kept_bytes_per_token_per_layer"] = kept_c / pages / out["page_row_tokens"] / spec["text"]["num_hidden_layers"]
        out["hidden_size"] = spec["text"]["hidden_size"]
        out["forward_peak_GiB"] = (fwd.peak - fwd.start) / 2**30       # above the start: the vision tower, one layer
        out["backward_peak_GiB"] = (bwd.peak - fwd.start) / 2**30      # above the start: kept + one layer's recompute
        out["backward_recompute_GiB"] = (bwd.peak - bwd.start) / 2**30  # above the forward's end
        del q, cand, loss
        with AnonPeak() as vis:        # the frozen vision tower alone, in training mode: no graph
            model.base_model().visual(c_in["pixel_values"].to(dtype), grid_thw=c_in["image_grid_thw"])
        patches = c_in["pixel_values"].shape[0]
        out["vision_peak_per_patch_KiB"] = (vis.peak - vis.start) / patches / 2**10
        out["layer_bytes_per_token"] = layer_bytes_per_token(spec["text"], spec["family"])   # no checkpointing
        out["recompute_bytes_per_token"] = (bwd.peak - bwd.start) / (pages * out["page_row_tokens"])
        model.save_pretrained(f"{tmp}/ck")
        back = MetaEmbed.from_pretrained(f"{tmp}/ck")
        model.eval()
        torch.testing.assert_close(back.encode_candidates([""], [page]), model.encode_candidates([""], [page]))
        out["checkpoint_MiB"] = os.path.getsize(f"{tmp}/ck/model.safetensors") / 2**20
        out["save_reload_identical"] = True
        out["process_peak_GiB"] = _status("VmHWM") / 2**30
    out["total_s"] = time.perf_counter() - t0
    return out


def mode_rehearse(args):
    """a full-size backbone with random weights, rehearsed on this CPU."""
    r = rehearse(args.rehearse)
    print(json.dumps(r, indent=1))
    write_json(args.json, r)


def mode_memory_table(args):
    """the official recipe's per-device memory, by arithmetic from the rehearsals' measurements."""
    import glob
    paths = args.memory_table or sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                                "docs", "rehearse-*.json")))
    measured = []
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        if "vision_peak_per_patch_KiB" not in r:
            raise SystemExit(f"{path}: no vision_peak_per_patch_KiB; rerun python -m bench --rehearse {r.get('name')}")
        measured.append(r)
    if not measured:
        raise SystemExit("no rehearsal results: run python -m bench --rehearse qwen2-vl-2b --json docs/rehearse-qwen2-vl-2b.json")
    # a text query: about 48 tokens + 16 Meta Tokens; an image query: 1,024 visual tokens, the prompt, 16
    cases = {"document batch: text queries (64 tokens), page candidates": dict(query_tokens=64),
             "every row an image (the worst case)": dict(query_tokens=1070),
             "every row an image, GradCache chunk 8": dict(query_tokens=1070, chunk=8),
             "every row an image, GradCache chunk 48 (one GPU, 384 rows)": dict(query_tokens=1070, chunk=48),
             "every row an image, GradCache chunk 8, FSDP over 8 GPUs": dict(query_tokens=1070, chunk=8, fsdp=8)}
    out = {"from": [r["name"] + " on " + r["cpu"] for r in measured],
           "cases": {case: memory_table(measured, **kw) for case, kw in cases.items()}}
    card = 80e9 / 2**30
    for r in measured:        # the arithmetic's trained count against a built model's (not Qwen3.5's layers)
        if REHEARSAL_CONFIGS[r["name"]]["family"] != "qwen3_5":
            print(f"{r['name']}: LoRA + Meta Tokens {trained_parameters(REHEARSAL_CONFIGS[r['name']]['text']):,} by "
                  f"arithmetic, {r['trained_parameters']:,} built")
    for case, t in out["cases"].items():
        print(f"\n{case}; batch {t['batch']} per device, {t['negatives']} hard negative; GiB:")
        print(f"{'model':<15}{'weights':>9}{'LoRA+Adam':>11}{'kept':>8}{'transient':>11}  {'(of)':<16}{'total':>7}"
              f"{'left of 80 GB':>15}")
        for row in t["rows"]:
            print(f"{row['model']:<15}{row['weights']:>9.1f}{row['trained']:>11.1f}{row['kept']:>8.1f}"
                  f"{row['transient']:>11.1f}  {row['transient_is']:<16}{row['total']:>7.1f}"
                  f"{card - row['total']:>15.1f}")
    print(f"\n80 GB = {card:.1f} GiB; CUDA's context and the allocator's slack are not counted; from the "
          "rehearsals of " + ", ".join(out["from"]))
    write_json(args.json, out)


def mode_grad_cache_one(args):
    """one GradCache measurement (in a child process)."""
    print(json.dumps(grad_cache_step_memory(*args.grad_cache_one)))


def mode_grad_cache(args):
    """GradCache memory, each chunk size in a fresh process."""
    import subprocess
    import sys
    rows = []
    for chunk in [0] + [int(c) for c in args.chunks.split(",")]:
        out = subprocess.run([sys.executable, "-m", "bench", "--grad-cache-one", str(args.grad_cache), str(chunk)],
                             capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    print(f"one training step, tiny backbone, batch {args.grad_cache} (+1 hard negative each), "
          f"{base['visual_tokens_per_image']} visual tokens per image:")
    for r in rows:
        print(f"  {'plain' if not r['chunk'] else 'GradCache chunk ' + str(r['chunk']):<18} process peak "
              f"{r['peak_bytes'] / 2**20:6.0f} MiB ({r['peak_bytes'] / base['peak_bytes']:.2f}x; "
              f"{r['rss_before_bytes'] / 2**20:.0f} MiB before the step), {r['seconds']:.1f} s, loss {r['loss']:.6f}")
    write_json(args.json, rows)


def mode_eval_memory(args):
    """evaluation memory against the index's size."""
    r = eval_memory(args.eval_memory, args.index_dir)
    where = f"on disk ({args.index_dir})" if args.index_dir else "in memory"
    print(f"{r['candidates']} candidates x 64 x {r['D']}, bf16 index {where}: {r['index_bytes'] / 2**30:.2f} GiB; "
          f"peak host memory beyond the model {r['peak_extra_bytes'] / 2**30:.2f} GiB = "
          f"{r['ratio']:.2f}x the index ({r['seconds']:.0f} s)")
    write_json(args.json, r)
