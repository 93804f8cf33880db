"""Backbones: hub aliases, the offline `tiny` Qwen2-VL built in code, loading, LoRA, and the
images and processor they take."""
import os
import warnings
from dataclasses import dataclass

import torch
from transformers.models.qwen2_vl import Qwen2VLProcessor

BACKBONES = {
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2.5-vl-32b": "Qwen/Qwen2.5-VL-32B-Instruct",
    **{f"qwen3-vl-{s}": f"Qwen/Qwen3-VL-{s.upper()}-Instruct" for s in ("2b", "4b", "8b", "32b")},
    **{f"qwen3.5-{s}": f"Qwen/Qwen3.5-{s.upper()}" for s in ("0.8b", "2b", "4b", "9b", "27b")},
}
# the backbones built in code (random weights, no hub access), by family: `tiny` is the default
OFFLINE = {"tiny": "qwen2_vl", "tiny-qwen3-vl": "qwen3_vl", "tiny-qwen3.5": "qwen3_5"}


def is_offline(name):
    """The one place that decides whether a backbone is an offline one, built in code."""
    return name in OFFLINE


@dataclass(frozen=True)
class Family:
    """What differs between the supported families; adding one is one entry in FAMILIES."""
    model: str             # the base model's transformers class (the hub repos hold *ForConditionalGeneration)
    patch: int             # pixels of a patch edge: a visual token is (patch x 2)^2 pixels (2 x 2 merge)
    lora_language: str     # the language model's LoRA targets (a regex over module names)
    lora_vision: str       # the vision tower's, with --lora-vision
    embeds_only: bool      # the forward takes inputs_embeds alone (input_ids with it is refused)


ATTENTION_MLP = r"self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj"
FAMILIES = {
    "qwen2_vl": Family("Qwen2VLModel", 14, rf"layers\.\d+\.({ATTENTION_MLP})",
                       r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))", False),
    "qwen2_5_vl": Family("Qwen2_5_VLModel", 14, rf"layers\.\d+\.({ATTENTION_MLP})",
                         r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj))", False),
    "qwen3_vl": Family("Qwen3VLModel", 16, rf"layers\.\d+\.({ATTENTION_MLP})",
                       r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc(1|2))", True),
    # Qwen3.5: Gated DeltaNet layers (linear_attn) between full-attention ones
    "qwen3_5": Family("Qwen3_5Model", 16,
                      rf"layers\.\d+\.({ATTENTION_MLP}|linear_attn\.(in_proj_qkv|in_proj_z|in_proj_a|in_proj_b|out_proj))",
                      r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc(1|2))", True),
}


def family_of(backbone):
    """The Family of a loaded backbone (with or without its LoRA wrapper), or one line naming
    what is supported."""
    kind = getattr(backbone.config, "model_type", "")
    if kind not in FAMILIES:
        moe = " (mixture-of-experts variants are not supported: LoRA and FSDP are untested on them)" \
            if "moe" in kind else ""
        raise ValueError(f"a {kind} backbone{moe}; MetaEmbed here supports {', '.join(FAMILIES)}")
    return FAMILIES[kind]


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


def tiny_tokenizer(vocab_size):
    """A byte-level BPE trained on TINY_CORPUS, with the Qwen special tokens, padding on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(TINY_CORPUS.split("\n") * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="left")


def tiny_config(family, t, tokenizer):
    """The config of a small random model of a family, sized by t (TINY and its overrides)."""
    import transformers
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    half = head_dim // 2  # M-RoPE: mrope_section (temporal, height, width) sums to head_dim / 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(vocab_size=len(tokenizer), hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
                num_key_value_heads=t["num_key_value_heads"], max_position_embeddings=4096,
                rope_parameters=dict(rope_type="default", rope_theta=t["rope_theta"], mrope_section=section),
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=False)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=False)
    if family == "qwen2_vl":
        vision = dict(depth=t["vision_depth"], embed_dim=t["vision_embed_dim"], hidden_size=t["hidden_size"],
                      num_heads=t["vision_heads"], mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    if family == "qwen2_5_vl":   # windowed vision attention, one full-attention block
        vision = dict(depth=t["vision_depth"], hidden_size=t["vision_embed_dim"], out_hidden_size=t["hidden_size"],
                      intermediate_size=2 * t["vision_embed_dim"], num_heads=t["vision_heads"], patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    # Qwen3-VL / Qwen3.5: 16 px patches, interleaved M-RoPE; Qwen3.5 alternates Gated DeltaNet
    # (linear attention) and full-attention layers
    text.update(head_dim=head_dim)
    text["rope_parameters"].update(mrope_interleaved=True, partial_rotary_factor=1.0)
    vision = dict(depth=t["vision_depth"], hidden_size=t["vision_embed_dim"], intermediate_size=2 * t["vision_embed_dim"],
                  num_heads=t["vision_heads"], out_hidden_size=t["hidden_size"], patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=64)
    if family == "qwen3_vl":
        return transformers.Qwen3VLConfig(text_config=text, vision_config={**vision, "deepstack_visual_indexes": [0]},
                                          **tokens)
    text.update(layer_types=["linear_attention", "full_attention"] * (t["num_hidden_layers"] // 2),
                linear_num_key_heads=2, linear_num_value_heads=t["num_attention_heads"], linear_key_head_dim=head_dim,
                linear_value_head_dim=head_dim)
    return transformers.Qwen3_5Config(text_config=text, vision_config=vision, **tokens)


def build_tiny_backbone(seed=0, family="qwen2_vl", **overrides):
    """A small random model of a family + byte-level BPE tokenizer + image processor, built in code (no hub)."""
    import transformers
    t = {**TINY, **overrides}
    tokenizer = tiny_tokenizer(t["vocab_size"])
    config = tiny_config(family, t, tokenizer)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = getattr(transformers, FAMILIES[family].model)(config)
    patch = FAMILIES[family].patch
    lo, hi = (t["min_pixels"], t["max_pixels"]) if patch == 14 else (32 * 32, 128 * 128)
    image_processor = image_processor_class()(min_pixels=lo, max_pixels=hi, patch_size=patch, merge_size=2,
                                              temporal_patch_size=2)
    return backbone, ImageTextProcessor(image_processor, tokenizer)


def save_hub_layout(config, tokenizer, path, dtype=None, base_state=None):
    """A model of `config` saved the way its hub repo is laid out: the *ForConditionalGeneration
    class (config.json with nested configs, model.safetensors with the hub's weight names), the
    tokenizer, and the image processor with the hub's own pixel bounds (up to 16,384 visual
    tokens). Random weights, or the base model's `base_state`. Loaded by folder name, it takes
    the real-backbone path (AutoModel, LoRA, bf16), with no hub access."""
    import transformers
    family = FAMILIES[config.model_type]
    full = getattr(transformers, family.model.replace("Model", "ForConditionalGeneration"))(config)
    if base_state is not None:
        full.model.load_state_dict(base_state)
    full.to(dtype or full.dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    token = (2 * family.patch) ** 2
    image_processor_class()(min_pixels=4 * token, max_pixels=token * 16384, patch_size=family.patch, merge_size=2,
                            temporal_patch_size=2).save_pretrained(path)
    return str(path)


def image_processor_class():
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


def hub_reachable(timeout=5.0):
    """-> (reachable, host): whether the hub answers a connection (HF_HUB_OFFLINE=1: never asked)."""
    import socket
    from urllib.parse import urlparse
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False, host
    try:
        socket.create_connection((host, url.port or (80 if url.scheme == "http" else 443)), timeout=timeout).close()
        return True, host
    except OSError:
        return False, host


def require_hub(repo_id):
    """A hub model neither in the local cache nor reachable -> one line naming it and what to do
    (instead of a minute of retries and a traceback from deep inside the hub client)."""
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    reachable, host = hub_reachable()
    if not reachable:
        raise FileNotFoundError(f"model '{repo_id}' is not in the local cache and the hub ({host}) cannot be "
                                f"reached to fetch it: download it where the hub is reachable (hf download "
                                f"{repo_id} --local-dir DIR) and pass --backbone DIR")


def check_backbone(name):
    """An alias, local folder or hub id -> what transformers loads; one line if it cannot be had
    (called before anything is written, and by load_backbone)."""
    if is_offline(name):
        return name
    name = BACKBONES.get(name, name)
    if not os.path.isdir(name):
        if not looks_like_hub_id(name):
            raise ValueError(f"unknown backbone {name!r}: not an alias ({', '.join([*OFFLINE, *BACKBONES])}), "
                             f"not a local folder, and not a hub id (owner/name)")
        require_hub(name)
    return name


def load_backbone(name, dtype=None, attn_implementation="sdpa"):
    """A hub id or local folder -> (Qwen2-VL / Qwen2.5-VL base model, processor)."""
    from transformers import AutoModel, AutoTokenizer
    name = check_backbone(name)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        backbone = AutoModel.from_pretrained(name, dtype=dtype or torch.bfloat16,
                                             attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")
        image_processor = image_processor_class().from_pretrained(name)
    except OSError as e:
        raise FileNotFoundError(f"could not load backbone '{name}': {e}. Use a hub id you can reach, a local "
                                f"folder holding its files, or an alias ({', '.join([*OFFLINE, *BACKBONES])}; the tiny ones "
                                f"are offline)") from None
    try:
        family_of(backbone)
    except ValueError as e:
        raise ValueError(f"backbone '{name}' is {e}") from None
    return backbone, ImageTextProcessor(image_processor, tokenizer)


def load_saved(path, config):
    """The backbone and processor of a saved checkpoint: `tiny` rebuilt from its saved config (its
    weights are in the checkpoint), a real one reloaded by name; the processor as saved."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer
    if is_offline(config.backbone):
        saved = AutoConfig.from_pretrained(path)
        backbone = getattr(transformers, FAMILIES[saved.model_type].model)(saved)
        backbone.config._attn_implementation = "sdpa"
    else:
        backbone, _ = load_backbone(config.backbone, config.dtype, config.attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    return backbone, ImageTextProcessor(image_processor_class().from_pretrained(path), tokenizer)


def max_text_tokens(model):
    """The longest text a prompt can carry: the backbone's positions less the meta tokens and the
    prompt's own (chat markers, image placeholders, the query suffix: 64 is ample)."""
    positions = model.base_model().config.get_text_config().max_position_embeddings
    return positions - model.config.num_query_tokens - model.config.num_candidate_tokens - 64


# LoRA as the official config: gaussian init (B = 0, so training starts from the base model) on the
# language model's attention and MLP projections (and Qwen3.5's linear-attention ones);
# lora_vision adds the vision tower's. The names are each family's (FAMILIES).

def add_lora(backbone, config):
    from peft import LoraConfig, get_peft_model
    f = family_of(backbone)
    targets = rf".*language_model.*({f.lora_language})" + (rf"|.*visual.*({f.lora_vision})" if config.lora_vision else "")
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, init_lora_weights="gaussian")
    return get_peft_model(backbone, lora)


def checkpoint_activations(backbone):
    """Gradient checkpointing on every vision block and decoder layer, non-reentrant. transformers
    also hooks each input embedding to make its output require grad, which only reentrant
    checkpointing needs; Qwen2/2.5-VL's vision tower reports its patch embedding as one, so a
    frozen tower got a graph through every block, kept their inputs and was recomputed in backward
    for no gradient (measured in docs/training.md). The hooks go: the Meta Tokens and the LoRA
    weights make the states that need a gradient need one."""
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):     # the newer name of the same call
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    backbone.disable_input_require_grads()


# -----------------------------------------------------------------------------
# images and the processor

class Batches(torch.utils.data.Dataset):
    """Batch b of (texts, images) -> prepare(texts, images, first=b * batch_size), the processor
    tensors; a DataLoader runs it in worker processes (prepare: a picklable partial)."""

    def __init__(self, prepare, texts, images, batch_size):
        self.prepare, self.texts, self.images, self.bs = prepare, texts, images, batch_size

    def __len__(self):
        return -(-len(self.texts) // self.bs)

    def __getitem__(self, b):
        lo, hi = b * self.bs, (b + 1) * self.bs
        return self.prepare(self.texts[lo:hi], self.images[lo:hi], first=lo)

    def loader(self, workers=0, pin=False, progress=None):
        """A DataLoader over these batches, prepared in `workers` processes (0: this one), pinned
        where asked; progress: a tqdm bar's title (None / False: no bar)."""
        out = torch.utils.data.DataLoader(self, batch_size=None, num_workers=workers, pin_memory=pin)
        if progress:
            from tqdm import tqdm
            out = tqdm(out, desc=progress, unit="batch", leave=False)
        return out


class ImageTextProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor (which needs torchvision); left padding,
    so the meta tokens appended after it are the last positions of every row."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        tokenizer.padding_side = "left"
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


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


def image_key(image):
    """What makes two images the same: a path's text, or a decoded image's pixels (and size)."""
    if image is None or isinstance(image, str):
        return image
    import hashlib
    return hashlib.sha1(image.tobytes()).hexdigest() + str(image.size)


def to_rgb(im):
    """8-bit RGB. 16- and 32-bit integer images are scaled from their bit depth and float images
    from [0, 1] (PIL's own convert("RGB") clips them: a 16-bit scan turns white, a [0, 1] float
    image black)."""
    import numpy as np
    from PIL import Image
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        x = np.asarray(im, dtype=np.float64)
        top = 1.0 if im.mode == "F" and x.max(initial=0) <= 1.0 else 65535.0 if im.mode.startswith("I;16") or \
            x.max(initial=0) <= 65535 else float(x.max())
        im = Image.fromarray(np.clip(x / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")   # decoded from files and bytes; nothing else
# (Pillow would open EPS / PS through Ghostscript, an external program, and dozens of rarer formats)


def load_image(image, where="", max_pixels=None, draft=None):
    """PIL image, path, a file's bytes (an upload), or a zero-argument callable returning one (a
    lazily decoded data set row) -> RGB PIL image. Files and bytes are decoded only as FORMATS,
    whatever their name says. A missing, unreadable or unusable file is named in the error; an
    image under 28 px on an edge is upsized to 28 (the processor cannot take less than one visual
    token). max_pixels: refuse a file or bytes whose header says more (before decoding); draft
    (w, h): a JPEG may be decoded at a reduced scale no smaller than that (thumbnails)."""
    import io

    from PIL import Image
    if callable(image) and not isinstance(image, Image.Image):
        try:                                          # a lazily decoded data set row
            image = image()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot decode image{where}: {e}") from None
    if isinstance(image, (str, os.PathLike, bytes)):
        name = f" of {len(image):,} bytes" if isinstance(image, bytes) else f" {str(image)!r}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)   # one line, not PIL's warning
                with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image, formats=FORMATS) as im:
                    if max_pixels and im.width * im.height > max_pixels:
                        raise ValueError(f"it is {im.width}x{im.height} = {im.width * im.height:,} pixels, over "
                                         f"the cap of {max_pixels:,}")
                    if draft and im.format == "JPEG":
                        im.draft("RGB", draft)
                    im = to_rgb(im)
        except Image.UnidentifiedImageError:
            raise FileNotFoundError(f"cannot read image{name}{where}: not a {', '.join(FORMATS)} image") from None
        except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise FileNotFoundError(f"cannot read image{name}{where}: {e}") from None
    elif isinstance(image, Image.Image):
        im, name = to_rgb(image), ""
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


# -----------------------------------------------------------------------------
# building a MetaEmbed around a backbone (metaembed.py's from_backbone / from_pretrained)

def build(cls, config, seed=0):
    """MetaEmbed.from_backbone's work: the backbone of `config` (a MetaEmbedConfig) by alias / hub id
    / folder, then assemble(): cls(config, backbone, processor) with fresh meta tokens (seeded)."""
    name = config.backbone
    if config.offline:
        backbone, processor = build_tiny_backbone(seed, OFFLINE[name], **config.tiny)
    else:
        backbone, processor = load_backbone(name, config.dtype, config.attn_implementation)
    return assemble(cls, config, backbone, processor, seed)


def assemble(cls, config, backbone, processor, seed=0):
    """A loaded or built backbone -> the MetaEmbed: the image cap resolved to the family's pixels
    (once, then saved), LoRA where asked, meta tokens drawn from `seed`."""
    if config.max_pixels is None and (config.max_visual_tokens or not config.offline):  # resolved once, saved
        tokens = config.max_visual_tokens or MAX_VISUAL_TOKENS   # 1024 x 28 x 28 or x 32 x 32 pixels
        config.max_pixels = tokens * visual_token_pixels(processor)
    set_image_bounds(processor, config.min_pixels, config.max_pixels)
    if config.offline:  # built in float32 with sdpa
        if config.attn_implementation != "sdpa":
            backbone.set_attn_implementation(config.attn_implementation)
        backbone = backbone.to(getattr(torch, config.dtype))
    if config.lora:
        backbone = add_lora(backbone, config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls(config, backbone, processor)
