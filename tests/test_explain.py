"""explain.py: the maps are the backbone's own attention, laid out on the image's grid; known
answers for the layout, a uniform attention and the attribution; bad input in one line."""
import json
import re

import pytest
import torch
from PIL import Image

import data
import explain
from apps import attention
from maxsim import maxsim
from metaembed import load_model


def wide_scene():
    """A non-square candidate: 112 x 56 pixels -> 2 x 4 merged visual tokens (28 px each)."""
    im = Image.new("RGB", (112, 56), (20, 20, 20))
    im.paste((230, 40, 40), (0, 0, 28, 28))
    im.paste((40, 200, 60), (84, 28, 112, 56))
    return im


def test_grid_follows_the_models_own_positions(tiny):
    """Visual token k sits at (k // cols, k % cols): the same cell as its M-RoPE height and width."""
    inputs = tiny.prepare([""], [wide_scene()], "candidate")
    positions, (rows, cols) = attention.visual_grid(tiny, inputs)
    assert (rows, cols) == (2, 4) and len(positions) == 8
    mrope, _ = tiny.base_model().get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                                image_grid_thw=inputs["image_grid_thw"],
                                                attention_mask=inputs["attention_mask"])
    h, w = mrope[1, 0, positions], mrope[2, 0, positions]              # (8,) each
    assert (h - h.min()).tolist() == [k // cols for k in range(8)]
    assert (w - w.min()).tolist() == [k % cols for k in range(8)]


def test_maps_are_the_backbones_output_attentions(tiny, monkeypatch):
    """Each map = the last layer's attention (mean over heads) from a candidate meta token to the
    visual tokens, read here from the backbone's own output_attentions; its sum is at most 1."""
    language = tiny.base_model().language_model
    before = language.config._attn_implementation
    res = attention.explain(tiny, wide_scene())
    assert language.config._attn_implementation == before == "sdpa"          # restored
    seen, forward = [], tiny.backbone.forward

    def with_attentions(*a, **k):
        out = forward(*a, **{**k, "output_attentions": True})
        seen.append(out.attentions[-1])
        return out
    tiny.backbone.set_attn_implementation("eager")
    try:
        monkeypatch.setattr(tiny.backbone, "forward", with_attentions)
        inputs = tiny.prepare([""], [wide_scene()], "candidate")
        with torch.no_grad():
            tiny.embed(inputs, "candidate")
    finally:
        tiny.backbone.set_attn_implementation(before)
    positions, _ = attention.visual_grid(tiny, inputs)
    want = seen[0][0, :, -tiny.config.num_candidate_tokens:][:, :, positions].float().mean(0).view(-1, 2, 4)
    torch.testing.assert_close(res["maps"], want, atol=1e-6, rtol=0)
    sums = res["maps"].flatten(1).sum(1)
    assert res["maps"].shape == (64, 2, 4) and bool((sums > 0).all()) and bool((sums <= 1 + 1e-6).all())
    torch.testing.assert_close(res["group_maps"][(2, 4)], res["maps"][1:4].mean(0))


def test_uniform_attention_is_a_flat_map_of_known_value():
    """With the last layer's q and k projections zeroed, attention is uniform over the positions a
    token sees: every map is flat, at 1 / (its position + 1), so 1 / value grows by exactly 1
    from one candidate meta token to the next."""
    from metaembed import MetaEmbed
    m = MetaEmbed.from_backbone("tiny", seed=0)
    attn = m.base_model().language_model.layers[-1].self_attn
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.zero_()
            proj.bias.zero_()
    maps = attention.explain(m, wide_scene())["maps"]                           # (64, 2, 4)
    flat = maps.flatten(1)
    torch.testing.assert_close(flat, flat[:, :1].expand_as(flat), atol=1e-7, rtol=0)
    inverse = 1 / flat[:, 0].double()
    torch.testing.assert_close(inverse[1:] - inverse[:-1], torch.ones(63, dtype=torch.float64), atol=2e-3, rtol=0)


def test_attribution_sums_to_maxsim(tiny):
    scene = data.synthetic_scene("eval", 3)
    image = data.render(scene)
    for budget in ((1, 1), (2, 4), (16, 64)):
        q = attention.explain(tiny, image, query=data.caption(scene), budget=budget)["query"]
        E_q = tiny.encode_queries([data.caption(scene)])
        E_c = tiny.encode_candidates([""], [image])
        assert len(q["winner"]) == budget[0] and q["budget"] == list(budget)
        assert sum(q["contribution"]) == pytest.approx(float(maxsim(E_q[:, :budget[0]], E_c[:, :budget[1]])[0, 0]),
                                                       abs=1e-5)
        dots = E_q[0, :budget[0]] @ E_c[0, :budget[1]].T
        assert q["winner"] == dots.argmax(1).tolist()


def test_cli_json_figure_and_bad_input(tiny_checkpoint, tmp_path, capsys):
    res = explain.main(["--checkpoint", tiny_checkpoint, "--query", "red top left", "--budget", "2x4",
                        "--out", str(tmp_path / "f.png"), "--json", str(tmp_path / "f.json")])
    saved = json.load(open(tmp_path / "f.json"))
    assert saved["grid"] == [3, 3] and len(saved["maps"]) == 64 and len(saved["maps"][0]) == 3
    assert set(saved["group_maps"]) == {"1x1", "2x4", "4x8", "8x16", "16x64"}
    assert saved["query"]["winner"] == res["query"]["winner"] and len(saved["query"]["contribution"]) == 2
    assert (tmp_path / "f.png").stat().st_size > 10_000
    assert explain.main(["--checkpoint", tiny_checkpoint, "--json", str(tmp_path / "g.json")])["query"] is not None
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG nope")
    for argv, said in ((["--image", str(bad)], "explain.py: error: cannot read image .*bad.png"),
                       (["--query", "x", "--budget", "32x64"], "explain.py: error: --budget .*exceeds the trained"),
                       (["--layers", "7"], "explain.py: error: --layers \\[7\\]: the language model has 2 layers")):
        with pytest.raises(SystemExit, match=said):
            explain.main(["--checkpoint", tiny_checkpoint, *argv])
    with pytest.raises(ValueError, match="has no image: there is nothing to map"):
        attention.explain(load_model(tiny_checkpoint, "t")[0], None, "a text-only candidate")


def test_a_hub_layout_qwen2_5_vl_folder(tmp_path):
    """A tiny random Qwen2.5-VL saved as a hub repo is laid out (the real class, its weight names,
    the hub's pixel bound), loaded by path through the real-backbone code (bf16, LoRA)."""
    from conftest import save_hub_layout_backbone
    from metaembed import MetaEmbed
    save_hub_layout_backbone(tmp_path / "q25", "qwen2_5_vl")
    model = MetaEmbed.from_backbone(str(tmp_path / "q25"), num_query_tokens=4, num_candidate_tokens=8)
    assert model.base_model().config.model_type == "qwen2_5_vl" and model.config.lora
    res = attention.explain(model, wide_scene(), query="red", budget=(2, 4))
    assert res["grid"] == [2, 4] and res["maps"].shape == (8, 2, 4)
    assert bool((res["maps"].flatten(1).sum(1) <= 1 + 1e-3).all())


def test_cli_parameters_are_checked_in_one_line(tiny_checkpoint, tmp_path, capsys):
    """#14: --study under 1, a layer named twice, an --out format matplotlib cannot write: one line
    each, before the work; --out without an extension writes and says FILE.png."""
    for argv, said in ((["--study", "-3"], "--study -3: the number of scenes must be at least 1"),
                       (["--study", "0"], "--study 0: the number of scenes must be at least 1"),
                       (["--out", str(tmp_path / "fig.xyz")], r"--out .*fig.xyz: .xyz is not a figure format"),
                       (["--layers", "0", "0", "-1"], "--layers 0 0 -1: names layer 0 twice"),
                       (["--layers", "1", "-1"], "--layers 1 -1: names layer 1 twice")):
        with pytest.raises(SystemExit) as e:
            explain.main(["--checkpoint", tiny_checkpoint] + argv)
        assert re.search(said, str(e.value) + capsys.readouterr().err), argv
    explain.main(["--checkpoint", tiny_checkpoint, "--out", str(tmp_path / "fignoext")])
    assert (tmp_path / "fignoext.png").stat().st_size > 1000
    assert f"wrote {tmp_path / 'fignoext.png'}" in capsys.readouterr().out


def test_linear_attention_layers_are_named(tmp_path):
    """#14: on Qwen3.5 (three of four layers linear attention) a layer without attention maps is
    named, with the layers that have them."""
    from metaembed import MetaEmbed
    model = MetaEmbed.from_backbone("tiny-qwen3.5", seed=0)
    layers = model.base_model().language_model.layers
    maps = [i for i, layer in enumerate(layers) if hasattr(layer, "self_attn")]
    linear = [i for i in range(len(layers)) if i not in maps]
    assert maps and linear
    model.save_pretrained(tmp_path / "ck")
    with pytest.raises(SystemExit, match=f"--layers {linear[0]}: layer {linear[0]} is linear attention and has no "
                                         f"attention map; the layers with maps are {', '.join(map(str, maps))}"):
        explain.main(["--checkpoint", str(tmp_path / "ck"), "--layers", str(linear[0])])


def test_the_figure_shows_a_16_bit_image_as_the_model_saw_it(tiny, tmp_path, monkeypatch):
    """#8: the figure draws the image through backbones.load_image: a 16-bit gradient, not white."""
    import numpy as np
    from matplotlib.axes import Axes

    from machinery.backbones import load_image
    x = np.tile(np.linspace(0, 65535, 84).astype(np.uint16), (84, 1))
    Image.fromarray(x).save(tmp_path / "g16.png")
    path = str(tmp_path / "g16.png")
    result = attention.explain(tiny, path)
    drawn = []
    show = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda self, X, *a, **k: drawn.append(np.asarray(X)) or show(self, X, *a, **k))
    attention.figure(result, path, str(tmp_path / "f.png"))
    rgb = [d for d in drawn if d.ndim == 3][0]
    assert np.array_equal(rgb, np.asarray(load_image(path))) and rgb.min() < 10
