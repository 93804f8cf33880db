"""
MetaEmbed: a vision-language backbone + learnable Meta Tokens -> a multi-vector embedding,
trained with the Matryoshka Multi-Vector Retrieval (MMR) loss.

Xiao et al., "MetaEmbed: Scaling Multimodal Retrieval at Test-Time with Flexible Late
Interaction", arXiv 2509.18095. Read top to bottom:
  1. config and budgets        (MetaEmbedConfig, GROUPS, parse_budgets)
  2. backbones                 (hub aliases, the offline `tiny` Qwen2-VL, LoRA)
  3. prompts and the processor (the paper's "simple prompt", left padding)
  4. the model                 (Meta Tokens appended, last-layer states read, L2-normalised)
  5. the loss                  (InfoNCE per Matryoshka group on prefix MaxSim scores)
  6. save / load               (safetensors + json, never pickle)
"""
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.qwen2_vl import Qwen2VLProcessor

from kernels import maxsim_reference

# -----------------------------------------------------------------------------
# 1. config and budgets

# Matryoshka groups (r_q, r_c): nested prefixes of the R_q query and R_c candidate vectors.
GROUPS = ((1, 1), (2, 4), (4, 8), (8, 16), (16, 64))

BACKBONES = {
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2.5-vl-32b": "Qwen/Qwen2.5-VL-32B-Instruct",
}


@dataclass
class MetaEmbedConfig:
    backbone: str = "tiny"           # alias in BACKBONES, "tiny" (offline), a hub id or a local folder
    num_query_tokens: int = 16       # R_q, Query Meta Tokens
    num_candidate_tokens: int = 64   # R_c, Candidate Meta Tokens
    groups: tuple = GROUPS           # Matryoshka groups (r_q, r_c), coarse to fine
    group_weights: tuple | None = None  # w_g, default 1 for every group
    temperature: float = 0.03        # tau of InfoNCE
    proj_dim: int | None = None      # optional linear projection; None: D = hidden size
    lora: bool | None = None         # None: full fine-tuning for `tiny`, LoRA for real backbones
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_vision: bool = False        # LoRA on the vision tower too (the official run: language model only)
    dtype: str | None = None         # backbone weights; None: float32 for `tiny`, bfloat16 otherwise
    min_pixels: int | None = None    # image bounds in pixels; None: the backbone's own minimum,
    max_pixels: int | None = None    # and at most MAX_VISUAL_TOKENS visual tokens (tiny: its own)
    attn_implementation: str = "sdpa"  # or "flash_attention_2" where installed
    query_suffix: bool | None = None  # the official <|endoftext|> x 10 query suffix; None: on for real backbones
    tiny: dict = field(default_factory=dict)  # overrides of TINY (hidden_size, layers, ...)

    def __post_init__(self):
        self.groups = tuple(tuple(int(x) for x in g) for g in self.groups)
        if self.group_weights is not None:
            self.group_weights = tuple(float(w) for w in self.group_weights)
        check_groups(self.groups, self.num_query_tokens, self.num_candidate_tokens)
        if self.group_weights is not None and len(self.group_weights) != len(self.groups):
            raise ValueError(f"group_weights has {len(self.group_weights)} entries but there are "
                             f"{len(self.groups)} groups {self.groups}")


def check_groups(groups, num_query_tokens, num_candidate_tokens):
    """Groups must be nested prefixes: non-decreasing, and within the trained tokens."""
    if not groups:
        raise ValueError("groups is empty: give at least one (r_q, r_c) pair")
    for (rq, rc), prev in zip(groups, ((0, 0),) + tuple(groups[:-1])):
        if rq < 1 or rc < 1:
            raise ValueError(f"group {(rq, rc)}: r_q and r_c must be at least 1")
        if rq > num_query_tokens or rc > num_candidate_tokens:
            raise ValueError(f"group {(rq, rc)} exceeds the meta tokens "
                             f"(R_q={num_query_tokens}, R_c={num_candidate_tokens})")
        if rq < prev[0] or rc < prev[1]:
            raise ValueError(f"groups must grow coarse to fine, got {prev} before {(rq, rc)}")


def parse_budgets(spec, groups=GROUPS, num_query_tokens=None, num_candidate_tokens=None):
    """'1,4,16,64' -> [(1, 1), (2, 4), (8, 16), (16, 64)].

    A number k names the group whose r_c == k; 'AxB' names (r_q, r_c) = (A, B) directly, which
    must lie within the trained tokens (default: the largest group)."""
    max_q = num_query_tokens or max(g[0] for g in groups)
    max_c = num_candidate_tokens or max(g[1] for g in groups)
    budgets = []
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        if re.fullmatch(r"\d+", part):
            match = [g for g in groups if g[1] == int(part)]
            if not match:
                raise ValueError(f"budget '{part}': no Matryoshka group has {part} candidate vectors; "
                                 f"the groups are {', '.join(f'{a}x{b}' for a, b in groups)} "
                                 f"(a number names r_c, 'AxB' names r_q x r_c)")
            budget = match[0]
        elif m := re.fullmatch(r"(\d+)x(\d+)", part):
            budget = (int(m.group(1)), int(m.group(2)))
        else:
            raise ValueError(f"budget '{part}' is not a number or 'AxB' (e.g. '1,4,16,64' or '2x4')")
        if budget[0] < 1 or budget[1] < 1:
            raise ValueError(f"budget '{part}': r_q and r_c must be at least 1")
        if budget[0] > max_q or budget[1] > max_c:
            raise ValueError(f"budget '{part}' = {budget[0]}x{budget[1]} exceeds the trained meta tokens "
                             f"(R_q={max_q}, R_c={max_c})")
        if budget not in budgets:
            budgets.append(budget)
    if not budgets:
        raise ValueError(f"no budget given in {spec!r}")
    return budgets


# -----------------------------------------------------------------------------
# 2. backbones

# The official config caps an image at 1,024 visual tokens (max_num_visual_tokens): a visual
# token is a 2x2 merge of 14 px patches, 28x28 pixels, so max_pixels = 1024 * 28 * 28. Without it
# a 2000x3000 page would be 7,597 tokens under the hub processor's own 12.8 MP bound.
MAX_VISUAL_TOKENS = 1024

# The offline backbone: a small random-initialised Qwen2-VL (same code path as the real ones).
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vision_depth=2, vision_embed_dim=64, vision_heads=4,
            vocab_size=1024, min_pixels=28 * 28, max_pixels=112 * 112, rope_theta=3.0)
# rope_theta 3, not 1e4: M-RoPE gives height and width the lowest rotary frequencies, and on a 3x3
# grid they must still turn visibly from cell to cell, or the model cannot tell where a colour is.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# A small built-in corpus for the tiny tokenizer's byte-level BPE (any text still encodes, by bytes).
TINY_CORPUS = """user Query: Describe the image. Find the image that matches the caption. Which scene is this?
a the of and in on with at to is are this that what which where image picture photo caption
red green blue yellow purple cyan orange white
top bottom left right center middle
"""


def build_tiny_backbone(seed=0, **overrides):
    """Random Qwen2-VL + byte-level BPE tokenizer + image processor, built in code (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLModel
    t = {**TINY, **overrides}
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=t["vocab_size"], special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(TINY_CORPUS.split("\n") * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", padding_side="left")
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    half = head_dim // 2  # M-RoPE: mrope_section (temporal, height, width) sums to head_dim / 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=t["hidden_size"],
                         intermediate_size=t["intermediate_size"],
                         num_hidden_layers=t["num_hidden_layers"],
                         num_attention_heads=t["num_attention_heads"],
                         num_key_value_heads=t["num_key_value_heads"], max_position_embeddings=4096,
                         rope_parameters=dict(rope_type="default", rope_theta=t["rope_theta"],
                                              mrope_section=section),
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False),
        vision_config=dict(depth=t["vision_depth"], embed_dim=t["vision_embed_dim"],
                           hidden_size=t["hidden_size"], num_heads=t["vision_heads"], mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = Qwen2VLModel(config)
    image_processor = _image_processor_class()(min_pixels=t["min_pixels"], max_pixels=t["max_pixels"],
                                               patch_size=14, merge_size=2, temporal_patch_size=2)
    return backbone, ImageTextProcessor(image_processor, tokenizer)


def _image_processor_class():
    # The PIL image processor needs no torchvision (the default one does).
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        return Qwen2VLImageProcessorPil
    except ImportError:  # older transformers 5.x
        from transformers import Qwen2VLImageProcessor
        return Qwen2VLImageProcessor


def looks_like_hub_id(path):
    """'owner/name', not a path: one '/', not absolute, not starting with '.' or '~'. A missing
    local folder is then said to be missing at once, not looked up on the hub."""
    return not (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") != 1)


def load_backbone(name, dtype=None, attn_implementation="sdpa"):
    """A hub id or local folder -> (Qwen2-VL / Qwen2.5-VL base model, processor)."""
    from transformers import AutoModel, AutoTokenizer
    aliases = ", ".join(["tiny", *BACKBONES])
    name = BACKBONES.get(name, name)
    if not os.path.isdir(name) and not looks_like_hub_id(name):
        raise ValueError(f"unknown backbone {name!r}: not an alias ({aliases}), not a local folder, "
                         f"and not a hub id (owner/name)")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        backbone = AutoModel.from_pretrained(name, dtype=dtype or torch.bfloat16,
                                             attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")
        image_processor = _image_processor_class().from_pretrained(name)
    except OSError as e:
        raise FileNotFoundError(f"could not load backbone '{name}': {e}. Use a hub id you can reach, a local "
                                f"folder holding its files, or an alias ({aliases}; 'tiny' is offline)") from None
    if getattr(backbone.config, "model_type", "") not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"backbone '{name}' is a {backbone.config.model_type}; MetaEmbed here supports "
                         f"Qwen2-VL and Qwen2.5-VL backbones")
    return backbone, ImageTextProcessor(image_processor, tokenizer)


# LoRA as the official config: gaussian init (B = 0, so training starts from the base model) on the
# language model's attention and MLP projections; lora_vision adds the vision tower's (Qwen2-VL
# names them qkv, proj, fc1, fc2; Qwen2.5-VL gate/up/down_proj).
LORA_LANGUAGE = r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
LORA_VISION = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2|gate_proj|up_proj|down_proj))"


def add_lora(backbone, config):
    from peft import LoraConfig, get_peft_model
    targets = f".*({LORA_LANGUAGE}|{LORA_VISION})" if config.lora_vision else f".*language_model.*{LORA_LANGUAGE}"
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, init_lora_weights="gaussian")
    return get_peft_model(backbone, lora)


# -----------------------------------------------------------------------------
# 3. prompts and the processor

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


QUERY_SUFFIX = "<|endoftext|>" * 10 + "\n"   # the official query augmentation, before the meta tokens


def format_prompt(text, has_image, side, query_suffix=False):
    """The paper's "simple prompt" in Qwen chat format, as the official processor builds it; side is
    'query' or 'candidate'. The image always comes first (MMEB's inline <|image_1|> is removed);
    an image with no text at all is described; a query may get the augmentation suffix."""
    text = text or ""
    if "<|image_1|>" in text:  # MMEB carries Phi-3.5-V's image token inline
        if not has_image:
            raise ValueError(f"text has an <|image_1|> placeholder but no image: {text[:80]!r}")
        text = text.replace("<|image_1|>\n", "").replace("<|image_1|>", "")
    if not text.strip() and has_image:
        text = "Describe the image."
    image = IMAGE_PLACEHOLDER if has_image else ""
    prefix = "Query: " if side == "query" else ""
    suffix = QUERY_SUFFIX if side == "query" and query_suffix else ""
    return f"<|im_start|>user\n{image}{prefix}{text}<|im_end|><|endoftext|>{suffix}"


def visual_token_pixels(processor):
    """Pixels of one visual token: (patch size x merge size)^2, 28 x 28 for Qwen2-VL / 2.5-VL."""
    ip = processor.image_processor
    return (ip.patch_size * ip.merge_size) ** 2


def set_image_bounds(processor, min_pixels=None, max_pixels=None):
    """Bound the pixels (so the visual tokens) of every image; None keeps the processor's bound.
    The size dict alone is what the processor reads (setting ip.max_pixels is deprecated)."""
    ip = processor.image_processor
    lo = min_pixels or ip.size["shortest_edge"]
    hi = max_pixels or ip.size["longest_edge"]
    if hi < visual_token_pixels(processor):
        raise ValueError(f"max_pixels {hi} is less than one visual token ({visual_token_pixels(processor)} pixels)")
    if not 0 < lo <= hi:
        raise ValueError(f"image bounds: min_pixels {lo} must be positive and at most max_pixels {hi}")
    ip.size["shortest_edge"], ip.size["longest_edge"] = lo, hi


MIN_EDGE = 28        # an image must cover one visual token (2x2 merged 14 px patches) on each edge
MAX_ASPECT = 200     # the Qwen2-VL processor refuses longer strips


def load_image(image, where=""):
    """PIL image, path, or a zero-argument callable returning one (a lazily decoded data set row)
    -> RGB PIL image. A missing, unreadable or unusable file is named in the error; an image under
    28 px on an edge is upsized to 28 (the processor cannot take less than one visual token)."""
    from PIL import Image
    if callable(image) and not isinstance(image, Image.Image):
        try:                                          # a lazily decoded data set row
            image = image()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot decode image{where}: {e}") from None
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                im = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise FileNotFoundError(f"cannot read image {str(image)!r}{where}: {e}") from None
        name = f" {str(image)!r}"
    elif isinstance(image, Image.Image):
        im, name = image.convert("RGB"), ""
    else:
        raise TypeError(f"image{where} must be a PIL image or a path, got {type(image).__name__}")
    w, h = im.size
    if min(w, h) == 0 or max(w, h) / min(w, h) > MAX_ASPECT:
        raise ValueError(f"image{name}{where} is {w}x{h}: an aspect ratio over {MAX_ASPECT} (or an "
                         f"empty edge) cannot be processed")
    if min(w, h) < MIN_EDGE:
        s = MIN_EDGE / min(w, h)
        im = im.resize((max(MIN_EDGE, round(w * s)), max(MIN_EDGE, round(h * s))), Image.BICUBIC)
    return im


class ImageTextProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor (which needs torchvision); left padding,
    so the meta tokens appended after it are the last positions of every row."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        tokenizer.padding_side = "left"
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


def prepare(processor, texts, images=None, side="query", first=0, query_suffix=False):
    """texts (list[str]), images (list[PIL | path | None]) -> processor tensors, left-padded.
    first: the index of texts[0] in the caller's list (errors name items by it)."""
    if images is None:
        images = [None] * len(texts)
    if len(images) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(images)} images")
    prompts = [format_prompt(t, im is not None, side, query_suffix) for t, im in zip(texts, images)]
    pil = [load_image(im, f" (item {first + i})") for i, im in enumerate(images) if im is not None]
    return processor(text=prompts, images=pil or None, padding=True, return_tensors="pt")


class _PreparedBatches(torch.utils.data.Dataset):
    """Batch b of (texts, images) -> processor tensors; a DataLoader runs it in worker processes."""

    def __init__(self, processor, texts, images, side, batch_size, query_suffix):
        self.args = processor, texts, images, side, batch_size, query_suffix

    def __len__(self):
        return -(-len(self.args[1]) // self.args[4])

    def __getitem__(self, b):
        processor, texts, images, side, bs, suffix = self.args
        return prepare(processor, texts[b * bs:(b + 1) * bs], images[b * bs:(b + 1) * bs], side, b * bs, suffix)


# -----------------------------------------------------------------------------
# 4. the model

class MetaEmbed(nn.Module):
    """Backbone VLM + R_q Query and R_c Candidate Meta Tokens (two sets, one table).

    Input: [image tokens; text tokens; M_q; M_c]. E_q = last-layer states at the M_q positions,
    E_c = those at the M_c positions, optionally projected, L2-normalised. Attention is causal,
    so a query needs only M_q appended (M_c comes after and cannot change E_q)."""

    def __init__(self, config, backbone, processor):
        super().__init__()
        self.config, self.backbone, self.processor = config, backbone, processor
        hidden = backbone.config.get_text_config().hidden_size
        emb = backbone.get_input_embeddings().weight
        # meta tokens start at the scale of the word embeddings
        std = emb.detach().float().std().item()
        self.meta_tokens = nn.Parameter(torch.randn(config.num_query_tokens + config.num_candidate_tokens,
                                                    hidden) * std)  # (R_q + R_c, H)
        self.proj = nn.Linear(hidden, config.proj_dim) if config.proj_dim else None
        self.dim = config.proj_dim or hidden  # D

    # -- construction ---------------------------------------------------------
    @classmethod
    def from_backbone(cls, name="tiny", seed=0, **kwargs):
        """Backbone by alias / hub id / folder, with fresh meta tokens (seeded)."""
        config = MetaEmbedConfig(backbone=name, **kwargs)
        if name == "tiny":
            backbone, processor = build_tiny_backbone(seed=seed, **config.tiny)
        else:
            backbone, processor = load_backbone(name, config.dtype, config.attn_implementation)
        return cls._from_parts(config, backbone, processor, seed)

    @classmethod
    def _from_parts(cls, config, backbone, processor, seed=0):
        if config.max_pixels is None and config.backbone != "tiny":  # resolved once, then saved
            config.max_pixels = MAX_VISUAL_TOKENS * visual_token_pixels(processor)
        set_image_bounds(processor, config.min_pixels, config.max_pixels)
        if config.backbone == "tiny" and config.attn_implementation != "sdpa":  # built with sdpa
            backbone.set_attn_implementation(config.attn_implementation)
        if config.dtype and config.backbone == "tiny":
            backbone = backbone.to(getattr(torch, config.dtype))
        if config.lora is None:  # resolved once, so a saved config says what was done
            config.lora = config.backbone != "tiny"
        if config.query_suffix is None:
            config.query_suffix = config.backbone != "tiny"
        if config.lora:
            backbone = add_lora(backbone, config)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = cls(config, backbone, processor)
        return model

    def set_image_bounds(self, min_pixels=None, max_pixels=None):
        """Change the image bounds (pixels) of this model's processor; kept in its config."""
        set_image_bounds(self.processor, min_pixels, max_pixels)
        self.config.min_pixels = min_pixels or self.config.min_pixels
        self.config.max_pixels = max_pixels or self.config.max_pixels

    @property
    def device(self):
        return self.meta_tokens.device

    def trained_parameters(self):
        """What training changes: meta tokens, projection, and LoRA adapters or the full backbone."""
        return {k: v for k, v in self.named_parameters() if v.requires_grad}

    # -- batching -------------------------------------------------------------
    def prepare(self, texts, images=None, side="query"):
        return prepare(self.processor, texts, images, side, query_suffix=self.config.query_suffix)

    def meta_states(self, inputs, R):
        """Append meta_tokens[:R] to every row; -> last-layer states at those positions (B, R, H)."""
        dev = self.device
        ids = inputs["input_ids"].to(dev)                                  # (B, L)
        B = ids.shape[0]
        pad = self.processor.tokenizer.pad_token_id
        ids = torch.cat([ids, ids.new_full((B, R), pad)], 1)               # (B, L + R)
        mask = torch.cat([inputs["attention_mask"].to(dev), ids.new_ones(B, R)], 1)
        types = inputs.get("mm_token_type_ids")
        types = (ids == self.backbone.config.image_token_id).long() if types is None else \
            torch.cat([types.to(dev), ids.new_zeros(B, R)], 1)             # meta tokens are text
        grid = inputs.get("image_grid_thw")
        grid = grid.to(dev) if grid is not None else None
        # M-RoPE positions from input_ids (meta tokens continue the 1-D text count); passing
        # inputs_embeds alone would give wrong positions.
        position_ids, _ = self.base_model().get_rope_index(ids, mm_token_type_ids=types,
                                                           image_grid_thw=grid, attention_mask=mask)
        embeds = self.backbone.get_input_embeddings()(ids)                 # (B, L + R, H)
        meta = self.meta_tokens[:R].to(embeds.dtype).expand(B, -1, -1)     # (B, R, H)
        embeds = torch.cat([embeds[:, :-R], meta], 1)
        pixels = inputs.get("pixel_values")
        out = self.backbone(input_ids=ids, inputs_embeds=embeds, attention_mask=mask,
                            position_ids=position_ids, mm_token_type_ids=types,
                            pixel_values=pixels.to(dev) if pixels is not None else None,
                            image_grid_thw=grid, use_cache=False)
        return out.last_hidden_state[:, -R:]                               # (B, R, H)

    def embed(self, inputs, side):
        """Processor tensors -> (B, R, D) unit vectors; side 'query' (R = R_q) or 'candidate' (R_c).

        Query: [x; M_q] -> E_q. Candidate: [x; M_q; M_c] -> E_c at the M_c positions."""
        R_q, R_c = self.config.num_query_tokens, self.config.num_candidate_tokens
        if side == "query":
            h = self.meta_states(inputs, R_q)                              # (B, R_q, H)
        else:
            h = self.meta_states(inputs, R_q + R_c)[:, R_q:]               # (B, R_c, H)
        if self.proj is not None:
            h = self.proj(h.to(self.proj.weight.dtype))                    # (B, R, D)
        return F.normalize(h.float(), dim=-1)

    def base_model(self):
        """The backbone without its LoRA wrapper (peft's PeftModel), if any."""
        b = self.backbone
        return b.get_base_model() if hasattr(b, "get_base_model") else b

    def forward(self, query_inputs=None, candidate_inputs=None):
        """One forward through the wrapper (so DDP / FSDP see it): -> (E_q (B, R_q, D) or None,
        E_c (B_c, R_c, D) or None), for whichever inputs are given."""
        return (self.embed(query_inputs, "query") if query_inputs is not None else None,
                self.embed(candidate_inputs, "candidate") if candidate_inputs is not None else None)

    @torch.no_grad()
    def _encode(self, texts, images, side, batch_size, progress, out, workers):
        """Encode in batches straight into `out` (N, R, D): a preallocated tensor of any dtype (a
        bf16 index: half the memory, no float32 copy) or anything that takes `out[i:j] = x` (an
        on-disk index). Batches are prepared (images decoded, tokenized) in a DataLoader, in
        `workers` processes where > 0, pinned on CUDA, so the GPU does not wait on PIL."""
        if isinstance(texts, str):
            raise TypeError(f"texts must be a list of strings, got one string ({texts[:40]!r}): wrap it in a list")
        texts = list(texts)
        images = [None] * len(texts) if images is None else list(images)
        if len(images) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(images)} images: give one image (or None) per text")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        R = self.config.num_query_tokens if side == "query" else self.config.num_candidate_tokens
        N = len(texts)
        if out is None:
            out = torch.empty(N, R, self.dim)
        elif tuple(out.shape) != (N, R, self.dim):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {(N, R, self.dim)}")
        batches = _PreparedBatches(self.processor, texts, images, side, batch_size, self.config.query_suffix)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers,
                                             pin_memory=self.device.type == "cuda")
        if progress:
            from tqdm import tqdm
            loader = tqdm(loader, desc="encode queries" if side == "query" else "encode candidates",
                          unit="batch", leave=False)
        was_training = self.training
        self.eval()
        amp = self.device.type == "cuda"
        try:
            for i, inputs in zip(range(0, N, batch_size), loader):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    q, c = self(inputs, None) if side == "query" else self(None, inputs)
                e = q if side == "query" else c                            # (B, R, D) float32
                out[i:i + e.shape[0]] = e.to(out.dtype).cpu() if isinstance(out, torch.Tensor) else e
        finally:
            self.train(was_training)
        return out

    def encode_queries(self, texts, images=None, batch_size=32, progress=False, out=None, workers=0):
        """-> (N, R_q, D) unit rows, float32 (or written into `out`, any dtype)."""
        return self._encode(texts, images, "query", batch_size, progress, out, workers)

    def encode_candidates(self, texts, images=None, batch_size=32, progress=False, out=None, workers=0):
        """-> (N, R_c, D) unit rows, float32 (or written into `out`, any dtype)."""
        return self._encode(texts, images, "candidate", batch_size, progress, out, workers)

    # -- save / load ----------------------------------------------------------
    def save_pretrained(self, path, state_dict=None):
        """Folder: metaembed.json, model.safetensors (what was trained), the backbone config
        (so `tiny` can be rebuilt) and the processor. Written to a temporary folder, then renamed.
        state_dict: a full state dict to save instead of self's (FSDP gathers one)."""
        from safetensors.torch import save_file
        path = os.fspath(path)
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        state = self.state_dict() if state_dict is None else state_dict
        # the random `tiny` base exists nowhere else: keep all of it; a hub base is reloaded by name
        if self.config.backbone != "tiny":
            state = {k: state[k] for k in self.trained_parameters()}
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(state, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "metaembed.json"), "w") as f:
            json.dump(asdict(self.config), f, indent=2)
        self.base_model().config.save_pretrained(tmp)
        self.processor.tokenizer.save_pretrained(tmp)
        self.processor.image_processor.save_pretrained(tmp)
        _replace_dir(tmp, path)

    @classmethod
    def from_pretrained(cls, path):
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLModel
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "metaembed.json")):
            raise FileNotFoundError(f"{path!r} is not a MetaEmbed checkpoint: no metaembed.json in it")
        problem = checkpoint_problem(path)  # before anything is built: a missing config.json would
        if problem:                         # otherwise build transformers' default (80-layer) Qwen2-VL
            raise FileNotFoundError(f"checkpoint {path!r} is incomplete: {problem}")
        with open(os.path.join(path, "metaembed.json")) as f:
            config = MetaEmbedConfig(**json.load(f))
        if config.backbone == "tiny":  # rebuilt from its saved config; weights come below
            backbone = Qwen2VLModel(Qwen2VLConfig.from_pretrained(path))
            backbone.config._attn_implementation = "sdpa"
        else:
            backbone, _ = load_backbone(config.backbone, config.dtype, config.attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")  # the saved processor
        processor = ImageTextProcessor(_image_processor_class().from_pretrained(path), tokenizer)
        model = cls._from_parts(config, backbone, processor)
        state = load_file(os.path.join(path, "model.safetensors"))
        own = model.state_dict()
        unknown = [k for k in state if k not in own]
        missing = [k for k in model.trained_parameters() if k not in state]
        if unknown or missing:
            raise ValueError(f"checkpoint {path!r} does not match its model: "
                             f"unknown {unknown[:3]}, missing {missing[:3]}")
        model.load_state_dict(state, strict=False)
        return model


CHECKPOINT_FILES = ("metaembed.json", "model.safetensors", "config.json", "tokenizer.json",
                    "tokenizer_config.json", "preprocessor_config.json")


def checkpoint_problem(path, files=CHECKPOINT_FILES):
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


DEFAULT_CHECKPOINT = "out/tiny-synthetic"   # where `python train.py` (the offline default) writes


def resolve_checkpoint(path, log=None, hint=""):
    """A checkpoint folder, or a train.py --out folder (the newest complete checkpoint in it);
    hint: what to say if there is none."""
    if os.path.isfile(os.path.join(path, "metaembed.json")):
        return path
    found = latest_checkpoint(path, log=log)
    if found:
        return found
    raise FileNotFoundError(f"no MetaEmbed checkpoint at {path!r}{hint}")


def latest_checkpoint(out, files=CHECKPOINT_FILES, log=None):
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


def write_atomic(path, text):
    """Write a text file whole or not at all: to PATH.tmp, then renamed over PATH."""
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def _replace_dir(tmp, path):
    """Atomically move a finished folder into place (the old one is removed only after)."""
    old = path.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# 5. the loss

def matryoshka_loss(q, pos, neg=None, groups=GROUPS, temperature=0.03, weights=None, offset=0,
                    neg_mask=None, return_groups=False):
    """Matryoshka Multi-Vector Retrieval loss.

    q (B, R_q, D); pos (B', R_c, D), B' >= B, the positive of query u at row offset + u (other
    rows: in-batch negatives, e.g. other ranks' positives); neg None, (B, R_c, D) or
    (B, K, R_c, D): each query's OWN hard negatives; neg_mask (B, K) bool, False = no negative
    there (its logit is dropped). For each group g = (r_q, r_c):
        s_g(q, c) = sum_{i<=r_q} max_{j<=r_c} <E_q^i, E_c^j>       (prefix MaxSim)
        L_g = InfoNCE over logits s_g / tau (positive, other positives, own negatives)
    L = sum_g w_g L_g / |G|   (w_g = 1: the mean over groups, as the official code)."""
    B = q.shape[0]
    if pos.shape[0] < offset + B:
        raise ValueError(f"pos has {pos.shape[0]} rows, fewer than offset {offset} + {B} queries")
    if neg is not None and neg.dim() == 3:
        neg = neg[:, None]                                                 # (B, K, R_c, D)
    weights = weights or [1.0] * len(groups)
    labels = torch.arange(B, device=q.device) + offset
    eye = torch.arange(B, device=q.device)
    losses = []
    for rq, rc in groups:
        qg = q[:, :rq]                                                     # (B, r_q, D)
        logits = maxsim_reference(qg, pos[:, :rc])                         # (B, B')
        if neg is not None:
            K = neg.shape[1]
            s = maxsim_reference(qg, neg[:, :, :rc].flatten(0, 1))         # (B, B*K)
            s = s.view(B, B, K)[eye, eye]                                  # (B, K) own negatives only
            if neg_mask is not None:
                s = s.masked_fill(~neg_mask.to(s.device, torch.bool).view(B, K), float("-inf"))
            logits = torch.cat([logits, s], 1)
        losses.append(F.cross_entropy(logits / temperature, labels))
    total = sum(w * l for w, l in zip(weights, losses)) / len(groups)
    return (total, torch.stack(losses)) if return_groups else total
