"""Every supported Qwen family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) keeps the same contract:
meta tokens after left padding as text positions for the model's own M-RoPE, last-layer states
there, LoRA on every language-model layer, images capped at 1,024 visual tokens in the family's
pixels, save/load, and the command lines. Tiny random models, built in code or saved as hub repos."""
import re

import pytest
import torch
from PIL import Image

import evaluate
import train
from conftest import save_hub_layout_backbone
from machinery.backbones import FAMILIES
from metaembed import MetaEmbed

OFFLINE = ["tiny", "tiny-qwen3-vl", "tiny-qwen3.5"]


def test_unknown_backbone_lists_the_aliases(tmp_path):
    with pytest.raises(ValueError, match=r"unknown backbone 'qwen-vl-9000': not an alias \(tiny, tiny-qwen3-vl, tiny-qwen3.5, qwen2-vl-2b"):
        MetaEmbed.from_backbone("qwen-vl-9000")
    with pytest.raises(ValueError, match="not a local folder"):
        MetaEmbed.from_backbone(str(tmp_path / "no-such-folder"))


def test_tiny_tokenizer_corpus_holds_the_synthetic_vocabulary():
    """The tiny tokenizer is trained on TINY_CORPUS: every word of the synthetic captions is in it
    (so a caption is a few whole-word tokens, not bytes), and nothing the data never says."""
    from data import CELLS, COLOURS
    from machinery.backbones import TINY_CORPUS
    caption_words = set(COLOURS) | {w for cell in CELLS for w in cell.split()}
    lines = TINY_CORPUS.strip().split("\n")
    assert caption_words <= set(TINY_CORPUS.split())
    assert set(" ".join(lines[2:]).split()) == caption_words       # the lines after the prompts


@pytest.fixture(scope="module", params=list(FAMILIES))
def hub_folder(request, tmp_path_factory):
    return request.param, save_hub_layout_backbone(tmp_path_factory.mktemp("hub") / request.param, request.param)


@pytest.mark.parametrize("name", OFFLINE)
def test_meta_tokens_are_causal_and_padding_free(name):
    m = MetaEmbed.from_backbone(name, seed=0)
    inputs = m.prepare(["a red circle", "blue"], [Image.new("RGB", (84, 56), "red"), None], "query")
    with torch.no_grad():
        short, full = m.meta_states(inputs, 16), m.meta_states(inputs, 80)     # [x; M_q] and [x; M_q; M_c]
    torch.testing.assert_close(short, full[:, :16], atol=1e-5, rtol=0)
    texts = ["red", "a much longer text about a small green triangle in the lower right corner", ""]
    images = [Image.new("RGB", (84, 84), "red"), None, Image.new("RGB", (112, 56), "blue")]
    batch = m.encode_candidates(texts, images)                                  # left-padded together
    for i in range(3):
        torch.testing.assert_close(m.encode_candidates([texts[i]], [images[i]])[0], batch[i], atol=1e-5, rtol=0)


def lora_per_layer(model, where):
    counts = {}
    for name, _ in model.named_modules():
        m = re.search(rf"{where}\.(\d+)\.(.+)\.lora_A$", name)
        if m:
            counts.setdefault(int(m.group(1)), set()).add(m.group(2))
    return counts


def test_the_hub_layout_folder_takes_the_real_path(hub_folder, tmp_path):
    family, folder = hub_folder
    m = MetaEmbed.from_backbone(folder, num_query_tokens=4, num_candidate_tokens=8)
    assert m.base_model().config.model_type == family and m.config.lora and m.config.query_suffix
    assert next(m.backbone.parameters()).dtype == torch.bfloat16
    layers = lora_per_layer(m, "layers")
    text = m.base_model().config.get_text_config()
    assert sorted(layers) == list(range(text.num_hidden_layers))               # every language-model layer
    kinds = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    for i, kind in enumerate(kinds):
        want = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} | (
            {f"self_attn.{p}_proj" for p in "qkvo"} if kind == "full_attention" else
            {f"linear_attn.{p}" for p in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")})
        assert layers[i] == want, (family, i, layers[i])
    assert lora_per_layer(m, "blocks") == {}                                    # the vision tower: not by default
    vision = lora_per_layer(MetaEmbed.from_backbone(folder, num_query_tokens=4, num_candidate_tokens=8,
                                                    lora_vision=True), "blocks")
    per_block = 5 if family == "qwen2_5_vl" else 4        # qkv, proj and the MLP's 2 (Qwen2.5-VL: gate, up, down)
    assert len(vision) == m.base_model().config.vision_config.depth and all(len(v) == per_block for v in vision.values())
    # a 2000 x 3000 page: at most 1,024 visual tokens of this family's (2 x patch)^2 pixels, and more than 700
    inputs = m.prepare([""], [Image.new("RGB", (2000, 3000), "white")], "candidate")
    tokens = int((inputs["input_ids"] == m.backbone.config.image_token_id).sum())
    assert 700 < tokens <= 1024, tokens
    # save / load: the same embeddings
    with torch.no_grad():
        for p in m.meta_tokens, *[p for n, p in m.named_parameters() if "lora_B" in n]:
            p.add_(0.01)
    m.save_pretrained(tmp_path / "ck")
    back = MetaEmbed.from_pretrained(tmp_path / "ck")
    img = Image.new("RGB", (64, 96), "green")
    torch.testing.assert_close(back.encode_candidates(["x"], [img]), m.encode_candidates(["x"], [img]))
    torch.testing.assert_close(back.encode_queries(["red top left"]), m.encode_queries(["red top left"]))


def step_gradients(m, checkpointing):
    """One training step's gradients; -> ({name: grad}, whether the vision tower's output needed grad)."""
    import data
    from machinery import backbones
    if checkpointing:
        backbones.checkpoint_activations(m.backbone)
    m.train()
    seen = []
    hook = m.base_model().visual.register_forward_hook(
        lambda mod, i, o: seen.append((o[0] if isinstance(o, tuple) else getattr(o, "pooler_output", o)).requires_grad))
    rows = [dict(qry_text="a red circle", qry_image=None, pos_text="", pos_image=Image.new("RGB", (96, 64), "red"),
                 negs=[("", Image.new("RGB", (64, 96), "blue"))], source="t")]
    q_in, c_in, mask = data.collate(rows, m.processor, query_suffix=True)
    torch.manual_seed(0)                                                       # the same LoRA dropout
    q, c = m(q_in, c_in)
    loss, _ = train.mmr_loss(m.config, q, c, mask, 0)
    loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    return grads, any(seen)


@pytest.mark.parametrize("lora_vision", [False, True])
def test_checkpointing_leaves_a_frozen_vision_tower_out_of_the_graph(hub_folder, lora_vision):
    family, folder = hub_folder
    m = MetaEmbed.from_backbone(folder, num_query_tokens=4, num_candidate_tokens=8, lora_vision=lora_vision)
    plain, _ = step_gradients(m, checkpointing=False)
    checked, vision_in_graph = step_gradients(m, checkpointing=True)
    assert vision_in_graph == lora_vision             # frozen: no graph, nothing kept or recomputed there
    assert plain.keys() == checked.keys() and any("visual" in n for n in plain) == lora_vision
    for n in plain:                                   # the same gradients, vision LoRA included
        torch.testing.assert_close(checked[n], plain[n], atol=1e-3, rtol=1e-2, msg=n)
    assert all(checked[n].abs().sum() > 0 for n in checked if "lora_B" in n)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_the_memory_tables_formulas_count_what_is_built_and_kept(family, tmp_path):
    """bench.layer_bytes_per_token (the per-device memory table's recompute term) against the bytes
    a LoRA'd bf16 decoder layer really saves for backward, without checkpointing (one layer more);
    the trained and per-layer parameter counts against the model's."""
    from bench import memory as bench
    import data
    kept = []
    for layers in (1, 2):
        folder = save_hub_layout_backbone(tmp_path / f"{family}-{layers}", family, hidden_size=256, intermediate_size=1024,
                                          num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=layers)
        m = MetaEmbed.from_backbone(folder, num_query_tokens=4, num_candidate_tokens=8)
        m.train()
        rows = [dict(qry_text="q", qry_image=None, pos_text="a long caption " * 40, pos_image=None, negs=[], source="t")]
        _, c_in, _ = data.collate(rows, m.processor, query_suffix=True)
        _, nbytes = bench.kept_for_backward(lambda: m(None, c_in), m)
        kept.append(nbytes)
    tokens = c_in["input_ids"].shape[1] + 12
    text = m.base_model().config.get_text_config().to_dict()
    formula = bench.layer_bytes_per_token(text, family)
    # the table's other terms: the trained parameters and (for FSDP) one layer's
    assert bench.trained_parameters(text, meta_tokens=12) == sum(p.numel() for p in m.trained_parameters().values())
    layer = m.base_model().language_model.layers[0]
    assert bench.layer_parameters(text, family) == sum(p.numel() for n, p in layer.named_parameters() if "lora_" not in n)
    assert abs((kept[1] - kept[0]) / tokens - formula) < 0.05 * formula, ((kept[1] - kept[0]) / tokens, formula)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_train_and_evaluate_on_a_folder(family, tmp_path):
    folder = save_hub_layout_backbone(tmp_path / family, family)
    path = train.main(["--backbone", folder, "--steps", "10", "--batch-size", "4", "--synthetic-size", "40",
                       "--query-tokens", "4", "--candidate-tokens", "8", "--warmup", "2", "--lr", "1e-3",
                       "--out", str(tmp_path / "out"), "--no-progress", "--save-every", "10"])
    assert path.endswith("checkpoint-0000010")
    res = evaluate.main(["--checkpoint", str(tmp_path / "out"), "--synthetic-scenes", "4", "--budgets", "1,8"])
    assert set(res["summary"]) == {"1x1", "4x8"}
    p1 = [t["4x8"]["P@1"] for t in res["tasks"].values()]          # the headline is the mean over the tasks
    assert len(p1) == 2 and res["summary"]["4x8"]["overall"] == pytest.approx(sum(p1) / 2)


def test_moe_and_other_models_are_refused_in_one_line(tmp_path):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
    from machinery.backbones import family_of
    config = Qwen3VLMoeConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                               num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16),
                              vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2,
                                                 out_hidden_size=32, num_position_embeddings=16))
    with pytest.raises(ValueError, match="a qwen3_vl_moe backbone \\(mixture-of-experts variants are not supported"):
        family_of(Qwen3VLMoeForConditionalGeneration(config).model)
