"""metaembed.py: meta tokens, encoding, the Matryoshka loss, budgets, save / load."""
import pytest
import torch
from PIL import Image

from conftest import brute_maxsim
from maxsim import maxsim_reference
from metaembed import (GROUPS, Budget, MetaEmbed, MetaEmbedConfig, format_prompt, group_losses, matryoshka_loss,
                       parse_budget, parse_budgets)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_encode_shapes_and_unit_norm(tiny):
    q = tiny.encode_queries(["a red circle", ""])
    c = tiny.encode_candidates(["blue square", ""], [None, Image.new("RGB", (84, 84), "red")])
    assert q.shape == (2, 16, tiny.dim) and c.shape == (2, 64, tiny.dim)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(2, 16))
    torch.testing.assert_close(c.norm(dim=-1), torch.ones(2, 64))
    # distinct meta tokens give distinct vectors
    assert (q[0, 0] - q[0, 1]).abs().max() > 1e-3


def test_projection_dimension():
    m = MetaEmbed.from_backbone("tiny", proj_dim=8, num_query_tokens=4, num_candidate_tokens=8,
                                groups=((1, 1), (4, 8)))
    q = m.encode_queries(["x"])
    assert q.shape == (1, 4, 8)


def test_budget_scores_are_prefix_maxsim(tiny):
    """Every budget's score equals a brute-force loop over the first r_q and r_c vectors."""
    texts = ["red circle top left", "two blue squares"]
    q = tiny.encode_queries(texts)
    c = tiny.encode_candidates(texts[::-1] + ["green star"])
    for rq, rc in GROUPS:
        fast = maxsim_reference(q[:, :rq], c[:, :rc]).double()
        torch.testing.assert_close(fast, brute_maxsim(q[:, :rq], c[:, :rc]), atol=1e-5, rtol=0)


def test_query_needs_only_query_meta_tokens(tiny):
    """Causal attention: E_q with only M_q appended == E_q read from a full [M_q; M_c] input."""
    inputs = tiny.prepare(["a red circle", "blue"], [Image.new("RGB", (84, 56), "red"), None], "query")
    R_q, R_c = tiny.config.num_query_tokens, tiny.config.num_candidate_tokens
    with torch.no_grad():
        short = tiny.meta_states(inputs, R_q)                  # [x; M_q]
        full = tiny.meta_states(inputs, R_q + R_c)             # [x; M_q; M_c]
    assert full.shape[1] == R_q + R_c
    torch.testing.assert_close(short, full[:, :R_q], atol=1e-5, rtol=0)
    assert (full[:, R_q:R_q + 1] - short[:, :1]).abs().max() > 1e-3


def test_batch_invariance(tiny):
    """An embedding does not depend on what it was batched with (padding, image sizes)."""
    texts = ["red", "a much longer text about a small green triangle in the lower right corner", ""]
    images = [Image.new("RGB", (84, 84), "red"), None, Image.new("RGB", (112, 56), "blue")]
    batch = tiny.encode_candidates(texts, images)
    for i in range(3):
        alone = tiny.encode_candidates([texts[i]], [images[i]])
        torch.testing.assert_close(alone[0], batch[i], atol=1e-4, rtol=0)
    qb = tiny.encode_queries(texts, images)
    qa = tiny.encode_queries(texts[1:2])
    torch.testing.assert_close(qa[0], qb[1], atol=1e-4, rtol=0)


def test_image_paths_and_missing_image(tiny, tmp_path):
    p = tmp_path / "img.png"
    im = Image.new("RGB", (84, 84), "green")
    im.save(p)
    torch.testing.assert_close(tiny.encode_candidates([""], [str(p)]), tiny.encode_candidates([""], [im]))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        tiny.encode_candidates([""], [str(tmp_path / "nope.png")])


def test_prompts():
    """The official processor's strings, exactly (simple prompts, image first, query suffix)."""
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    assert format_prompt("cat", False, "query") == "<|im_start|>user\nQuery: cat<|im_end|><|endoftext|>"
    assert format_prompt("cat", True, "candidate") == f"<|im_start|>user\n{pad}cat<|im_end|><|endoftext|>"
    assert format_prompt("", True, "candidate") == f"<|im_start|>user\n{pad}Describe the image.<|im_end|><|endoftext|>"
    assert format_prompt("<|image_1|>\nWhat is it?", True, "query") == \
        f"<|im_start|>user\n{pad}Query: What is it?<|im_end|><|endoftext|>"
    assert format_prompt("<|image_1|>\nWhat is it?", True, "query", query_suffix=True) == \
        f"<|im_start|>user\n{pad}Query: What is it?<|im_end|><|endoftext|>" + "<|endoftext|>" * 10 + "\n"
    assert format_prompt("a dog", False, "candidate", query_suffix=True) == \
        "<|im_start|>user\na dog<|im_end|><|endoftext|>"            # candidates never get the suffix
    with pytest.raises(ValueError, match="placeholder but no image"):
        format_prompt("<|image_1|>\nx", False, "query")
    assert not MetaEmbed.from_backbone("tiny").config.query_suffix       # tiny: off; real backbones: on


# -- the loss -----------------------------------------------------------------

def loop_loss(q, pos, neg, groups, tau, weights):
    """InfoNCE per group by explicit loops, for checking matryoshka_loss."""
    B = q.shape[0]
    total = 0.0
    for (rq, rc), w in zip(groups, weights):
        lg = 0.0
        for u in range(B):
            s = [brute_maxsim(q[u:u + 1, :rq], pos[v:v + 1, :rc])[0, 0] for v in range(pos.shape[0])]
            if neg is not None:
                s += [brute_maxsim(q[u:u + 1, :rq], neg[u, k:k + 1, :rc])[0, 0] for k in range(neg.shape[1])]
            s = torch.tensor(s) / tau
            lg += -(s[u] - torch.logsumexp(s, 0))
        total += w * lg / B
    return total / len(groups)


@pytest.mark.parametrize("K", [None, 1, 2])
def test_loss_matches_loops(K):
    B, D = 3, 8
    q, pos = unit(B, 16, D, seed=1), unit(B + 2, 64, D, seed=2)   # 2 extra in-batch negatives
    neg = None if K is None else unit(B, K, 64, D, seed=3)
    w = [1.0, 2.0, 0.5, 1.0, 3.0]
    got = matryoshka_loss(q, pos, neg, GROUPS, 0.05, w)
    want = loop_loss(q.double(), pos.double(), neg.double() if neg is not None else None, GROUPS, 0.05, w)
    assert abs(got.item() - float(want)) < 1e-4


def test_loss_uses_only_prefixes():
    """Changing vectors beyond the largest group's prefix never changes the loss; changing
    vector 1 changes every group except (1, 1)."""
    q, pos = unit(4, 16, 8, seed=4), unit(4, 64, 8, seed=5)
    groups = ((1, 1), (2, 4))
    base = group_losses(q, pos, groups=groups)
    q2, pos2 = q.clone(), pos.clone()
    q2[:, 2:] = unit(4, 14, 8, seed=6)
    pos2[:, 4:] = unit(4, 60, 8, seed=7)
    same = group_losses(q2, pos2, groups=groups)
    torch.testing.assert_close(same, base)
    pos2[:, 1] = unit(4, 8, seed=8)
    moved = group_losses(q2, pos2, groups=groups)
    assert moved[0] == base[0] and moved[1] != base[1]


def test_loss_neg_shapes_and_offset():
    q, pos, neg = unit(2, 16, 8, seed=9), unit(6, 64, 8, seed=10), unit(2, 64, 8, seed=11)
    torch.testing.assert_close(matryoshka_loss(q, pos, neg), matryoshka_loss(q, pos, neg[:, None]))
    # offset: this rank's positives at rows 2..3 (another rank's first)
    rolled = torch.cat([pos[2:4], pos[:2], pos[4:]])
    torch.testing.assert_close(matryoshka_loss(q, pos), matryoshka_loss(q, rolled, offset=2))
    with pytest.raises(ValueError, match="fewer than offset"):
        matryoshka_loss(q, pos, offset=5)


def test_gradients_reach_meta_tokens_and_loss_falls():
    torch.manual_seed(0)
    m = MetaEmbed.from_backbone("tiny", seed=1)
    texts = ["red circle", "blue square", "green star", "yellow ring"]
    images = [Image.new("RGB", (56, 56), col) for col in ("red", "blue", "green", "yellow")]
    qi, ci = m.prepare(texts, None, "query"), m.prepare([""] * 4, images, "candidate")
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for step in range(25):
        q, c = m(qi, ci)
        loss = matryoshka_loss(q, c)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert m.meta_tokens.grad is not None and m.meta_tokens.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# -- budgets, config, save / load ---------------------------------------------

def test_parse_budgets():
    assert parse_budgets("1,4,16,64") == [(1, 1), (2, 4), (8, 16), (16, 64)]
    assert parse_budgets("2x4, 16x64") == [(2, 4), (16, 64)]
    assert parse_budgets("3x5") == [(3, 5)]
    with pytest.raises(ValueError, match="budget '32'"):
        parse_budgets("1,32")
    with pytest.raises(ValueError, match="exceeds the trained meta tokens"):
        parse_budgets("16x128")
    with pytest.raises(ValueError, match="'abc'"):
        parse_budgets("abc")
    with pytest.raises(ValueError, match="exceeds"):
        parse_budgets("8x8", groups=((1, 1), (4, 4)))


def test_a_budget_is_a_small_type():
    b = parse_budget("2x4")
    assert b == (2, 4) and (b.r_q, b.r_c) == (2, 4) and str(b) == "2x4" and f"{b}" == "2x4"
    assert isinstance(b, Budget) and all(isinstance(x, Budget) for x in parse_budgets("1,16"))
    assert {b: 1}[(2, 4)] == 1                                       # a dict key the tuple finds
    cfg = MetaEmbedConfig(num_query_tokens=4, num_candidate_tokens=8)
    assert cfg.groups == ((1, 1), (2, 4), (4, 8)) and all(isinstance(g, Budget) for g in cfg.groups)
    assert cfg.budget("8") == (4, 8) and parse_budget(4, cfg) == (2, 4)   # one rule, the config's
    with pytest.raises(ValueError, match="--budget '16x64': 16x64 exceeds the trained meta tokens .R_q=4, R_c=8."):
        cfg.budget("16x64", name="--budget")
    with pytest.raises(ValueError, match="r_c=4 is not stored in this index, which holds r_c in 1, 8"):
        cfg.budget("2x4", stored=[1, 8])


def test_bad_config():
    with pytest.raises(ValueError, match="exceeds the meta tokens"):
        MetaEmbedConfig(num_candidate_tokens=32, groups=GROUPS)
    # groups left to the config: the paper's that fit, ending with (R_q, R_c)
    assert MetaEmbedConfig(num_candidate_tokens=32).groups == ((1, 1), (2, 4), (4, 8), (8, 16), (16, 32))
    assert MetaEmbedConfig(num_query_tokens=4, num_candidate_tokens=8).groups == ((1, 1), (2, 4), (4, 8))
    with pytest.raises(ValueError, match="coarse to fine"):
        MetaEmbedConfig(groups=((2, 4), (1, 1)))
    with pytest.raises(ValueError, match="group_weights"):
        MetaEmbedConfig(group_weights=(1.0,))


def test_save_load_round_trip(tmp_path):
    m = MetaEmbed.from_backbone("tiny", seed=3, proj_dim=16)
    with torch.no_grad():  # make the trained state differ from a fresh build
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    texts, images = ["a red circle", ""], [None, Image.new("RGB", (84, 84), "blue")]
    m.save_pretrained(tmp_path / "ckpt")
    assert not list(tmp_path.glob("*.tmp"))
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    m2 = MetaEmbed.from_pretrained(tmp_path / "ckpt")
    assert m2.config == m.config
    torch.testing.assert_close(m2.encode_queries(texts, images), m.encode_queries(texts, images), atol=0, rtol=0)
    torch.testing.assert_close(m2.encode_candidates(texts, images), m.encode_candidates(texts, images),
                               atol=0, rtol=0)
    # saving over an existing checkpoint replaces it whole
    m.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="no metaembed.json"):
        MetaEmbed.from_pretrained(tmp_path)


def test_lora_trains_only_adapters_and_meta(tmp_path):
    m = MetaEmbed.from_backbone("tiny", lora=True, lora_r=4, lora_alpha=4, proj_dim=8)
    names = list(m.trained_parameters())
    assert "meta_tokens" in names and "proj.weight" in names
    assert all("lora_" in n for n in names if n.startswith("backbone."))
    for p in ("q", "k", "v", "o"):                                     # the official targets: language model
        assert any(f"language_model.layers.1.self_attn.{p}_proj.lora_A" in n for n in names)
    for p in ("gate", "up", "down"):
        assert any(f"language_model.layers.1.mlp.{p}_proj.lora_B" in n for n in names)
    assert not any("visual" in n for n in names)
    assert all(float(p.abs().max()) == 0 for n, p in m.named_parameters() if "lora_B" in n)   # starts at the base
    with_vision = MetaEmbed.from_backbone("tiny", lora=True, lora_r=4, lora_alpha=4, lora_vision=True)
    assert any("blocks.0.attn.qkv.lora_A" in n for n in with_vision.trained_parameters())
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()
    m.save_pretrained(tmp_path / "lora")
    m2 = MetaEmbed.from_pretrained(tmp_path / "lora")
    torch.testing.assert_close(m2.encode_queries(["x y"]), m.encode_queries(["x y"]), atol=0, rtol=0)


def test_real_backbone_caps_pages_at_1024_visual_tokens(hub_backbone, tmp_path):
    """A 2000x3000 page through a real-layout backbone: at most 1,024 visual tokens by default (the
    official cap); the hub processor's own bound would give 7,597. The bound is saved and reloaded,
    and can be set explicitly."""
    m = MetaEmbed.from_backbone(hub_backbone, lora_r=2, lora_alpha=2)
    assert m.config.lora and m.config.max_pixels == 1024 * 28 * 28
    page = Image.new("RGB", (2000, 3000), "white")
    inputs = m.prepare([""], [page], "candidate")
    tokens = int(inputs["image_grid_thw"].prod()) // 4                   # 2x2 patches merge to a token
    assert 900 < tokens <= 1024, tokens
    assert int((inputs["input_ids"] == m.backbone.config.image_token_id).sum()) == tokens
    assert m.encode_candidates([""], [page]).shape == (1, 64, m.dim)
    m.save_pretrained(tmp_path / "ck")
    m2 = MetaEmbed.from_pretrained(tmp_path / "ck")
    assert m2.config.max_pixels == 1024 * 28 * 28
    assert torch.equal(m2.prepare([""], [page], "candidate")["image_grid_thw"], inputs["image_grid_thw"])
    small = MetaEmbed.from_backbone(hub_backbone, max_pixels=64 * 28 * 28, lora=False)
    assert int(small.prepare([""], [page], "candidate")["image_grid_thw"].prod()) // 4 <= 64
    with pytest.raises(ValueError, match="less than one visual token"):
        MetaEmbed.from_backbone(hub_backbone, max_pixels=100, lora=False)


def test_odd_images_are_upsized_or_named(tiny, tmp_path):
    """Images under 28 px on an edge are upsized (one visual token); strips past the processor's
    aspect limit and unreadable files are named in the error."""
    from machinery.backbones import load_image
    for size, want in (((1, 1), (28, 28)), ((5, 30), (28, 168)), ((27, 27), (28, 28)), ((28, 3), (261, 28))):
        small = Image.new("RGB", size, (200, 30, 10))
        big = load_image(small)
        assert big.size == want and [c for _, c in big.getcolors()] == [(200, 30, 10)]   # the same picture, upsized
        torch.testing.assert_close(tiny.encode_candidates([""], [small]), tiny.encode_candidates([""], [big]))
    with pytest.raises(ValueError, match=r"\(item 0\) is 1x300: an aspect ratio over 200"):
        tiny.encode_candidates([""], [Image.new("RGB", (1, 300))])
    bad = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), "blue").save(bad)
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(FileNotFoundError, match="truncated.png"):
        tiny.encode_candidates([""], [str(bad)])
    big = tmp_path / "bomb.png"                                 # past PIL's decompression-bomb limit
    Image.new("RGB", (300, 300)).save(big)
    from PIL import Image as PILImage
    old_limit = PILImage.MAX_IMAGE_PIXELS
    PILImage.MAX_IMAGE_PIXELS = 1000
    try:
        with pytest.raises(FileNotFoundError, match=r"bomb.png.*\(item 1\).*decompression bomb"):
            tiny.encode_candidates(["", ""], [Image.new("RGB", (28, 28)), str(big)])
        with pytest.raises(FileNotFoundError, match=r"image of [\d,]+ bytes \(the upload\).*decompression bomb"):
            load_image(big.read_bytes(), " (the upload)")                   # a file's bytes: the same rules
    finally:
        PILImage.MAX_IMAGE_PIXELS = old_limit


def test_encode_checks_its_inputs_up_front(tiny):
    with pytest.raises(TypeError, match="got one string .*wrap it in a list"):
        tiny.encode_queries("a red circle")
    with pytest.raises(ValueError, match="got 2 texts but 3 images"):
        tiny.encode_candidates(["a", "b"], [None, None, Image.new("RGB", (28, 28))], batch_size=1)
    for bs in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            tiny.encode_queries(["a"], batch_size=bs)
    out = torch.empty(3, 16, tiny.dim, dtype=torch.bfloat16)            # written in place, in its dtype
    got = tiny.encode_queries(["a", "b", "c"], batch_size=2, out=out)
    assert got is out
    torch.testing.assert_close(out.float(), tiny.encode_queries(["a", "b", "c"]), atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match=r"out has shape \(2, 16, \d+\), expected \(3, 16"):
        tiny.encode_queries(["a", "b", "c"], out=out[:2])




def test_the_docstrings_examples_run():
    """The worked examples in the docstrings of maxsim, matryoshka_loss, MetaEmbed.encode_queries
    and parse_budgets run and print what they say."""
    import doctest

    import maxsim
    import metaembed
    for fn in (maxsim.maxsim, metaembed.matryoshka_loss, metaembed.MetaEmbed.encode_queries, metaembed.parse_budgets):
        assert ">>>" in fn.__doc__, fn.__name__
        globs = {**vars(maxsim), **vars(metaembed), "torch": torch, "F": torch.nn.functional}
        runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
        for test in doctest.DocTestFinder().find(fn, fn.__name__, globs=globs):
            runner.run(test)
        assert runner.failures == 0 and runner.tries >= 1, (fn.__name__, runner.summarize(verbose=False))
