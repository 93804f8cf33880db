"""
MetaEmbed: a vision-language backbone + learnable Meta Tokens -> a multi-vector embedding,
trained with the Matryoshka Multi-Vector Retrieval (MMR) loss. Xiao et al., "MetaEmbed: Scaling
Multimodal Retrieval at Test-Time with Flexible Late Interaction", arXiv 2509.18095.

Read top to bottom, in the paper's order: 1. config, Matryoshka groups, budgets; 2. prompts;
3. the model (Meta Tokens appended, M-RoPE positions, last-layer states, projection, L2
normalisation); 4. the MMR loss; 5. using it (budgets named, encoding in batches, save / load).
Backbones, images, checkpoints' files, options and input checks live in machinery/.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from maxsim import maxsim_pairwise, maxsim_reference
from machinery import backbones, checkpoints, st_format
from machinery.checks import check_budget, check_encode_inputs, check_groups
from machinery.options import ScoringOptions

# -----------------------------------------------------------------------------
# 1. config, Matryoshka groups

class Budget(NamedTuple):
    """A test-time budget: the first r_q query vectors x the first r_c candidate vectors. Still the
    tuple (r_q, r_c) (it unpacks and compares as one); str() is the command lines' 'AxB'."""
    r_q: int
    r_c: int

    def __str__(self):
        return f"{self.r_q}x{self.r_c}"


# Matryoshka groups (r_q, r_c): nested prefixes of the R_q query and R_c candidate vectors.
GROUPS = ((1, 1), (2, 4), (4, 8), (8, 16), (16, 64))
Groups = tuple[tuple[int, int], ...]   # (r_q, r_c) pairs, coarse to fine (Budgets once in a config)
TEMPERATURE = 0.03   # tau of InfoNCE


def matryoshka_groups(R_q: int, R_c: int) -> tuple[Budget, ...]:
    """The paper's groups that fit within (R_q, R_c), ending with (R_q, R_c) itself."""
    groups = tuple(Budget(*g) for g in GROUPS if g[0] <= R_q and g[1] <= R_c)
    return groups if groups and groups[-1] == (R_q, R_c) else groups + (Budget(R_q, R_c),)


@dataclass
class MetaEmbedConfig:
    backbone: str = "tiny"           # alias (machinery/backbones.py), "tiny" (offline), a hub id or a folder
    num_query_tokens: int = 16       # R_q, Query Meta Tokens
    num_candidate_tokens: int = 64   # R_c, Candidate Meta Tokens
    groups: tuple | None = None      # Matryoshka groups (r_q, r_c), coarse to fine; None: matryoshka_groups
    group_weights: tuple | None = None  # w_g, default 1 for every group
    temperature: float = TEMPERATURE
    proj_dim: int | None = None      # optional linear projection; None: D = hidden size
    # how the backbone is run; None fields are decided here, once, and saved as decided
    lora: bool | None = None         # None: full fine-tuning for `tiny`, LoRA for real backbones
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_vision: bool = False        # LoRA on the vision tower too (the official run: language model only)
    dtype: str | None = None         # backbone weights; None: float32 for `tiny`, bfloat16 otherwise
    min_pixels: int | None = None    # image bounds in pixels; None: the backbone's own minimum,
    max_pixels: int | None = None    # and at most MAX_VISUAL_TOKENS visual tokens (tiny: its own)
    max_visual_tokens: int | None = None  # a cap in visual tokens instead: max_pixels = it x the family's token pixels
    attn_implementation: str = "sdpa"  # or "flash_attention_2" where installed
    query_suffix: bool | None = None  # the official <|endoftext|> x 10 query suffix; None: on for real backbones
    tiny: dict = field(default_factory=dict)  # overrides of backbones.TINY (hidden_size, layers, ...)

    def __post_init__(self):
        R_q, R_c = self.num_query_tokens, self.num_candidate_tokens
        self.groups = tuple(Budget(*(int(x) for x in g)) for g in (self.groups or matryoshka_groups(R_q, R_c)))
        if self.group_weights is not None:
            self.group_weights = tuple(float(w) for w in self.group_weights)
        check_groups(self.groups, R_q, R_c)
        if self.group_weights is not None and len(self.group_weights) != len(self.groups):
            raise ValueError(f"group_weights has {len(self.group_weights)} entries but there are "
                             f"{len(self.groups)} groups {self.groups}")
        real = not self.offline
        self.lora = real if self.lora is None else self.lora
        self.query_suffix = real if self.query_suffix is None else self.query_suffix
        self.dtype = self.dtype or ("bfloat16" if real else "float32")

    @property
    def offline(self) -> bool:
        return backbones.is_offline(self.backbone)

    def budget(self, spec: str | int | tuple, stored: list[int] | None = None, name: str = "budget") -> Budget:
        """The one budget rule, for every tool: 'AxB' (r_q x r_c directly), a number k (the group whose
        r_c == k, see budget_groups) or a pair (A, B) -> Budget, with r_q <= R_q and r_c <= R_c;
        `stored`: the r_c an index holds (it reads whole groups). A bad budget is one ValueError
        naming `name` (machinery.checks.check_budget)."""
        named = budget_groups(self.groups, self.num_query_tokens, self.num_candidate_tokens)
        return Budget(*check_budget(spec, named, (self.num_query_tokens, self.num_candidate_tokens), stored, name))


# -----------------------------------------------------------------------------
# 2. prompts

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
QUERY_SUFFIX = "<|endoftext|>" * 10 + "\n"   # the official query augmentation, before the meta tokens


def format_prompt(text: str, has_image: bool, side: str, query_suffix: bool = False) -> str:
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


def prepare(processor: backbones.ImageTextProcessor, texts: list[str], images: list | None = None,
            side: str = "query", first: int = 0, query_suffix: bool = False) -> dict:
    """texts (list[str]), images (list[PIL | path | None]) -> processor tensors, LEFT-padded, so
    the meta tokens appended after them are the last positions of every row. first: the index
    of texts[0] in the caller's list (errors name items by it)."""
    texts, images = check_encode_inputs(texts, images, 1)
    prompts = [format_prompt(t, im is not None, side, query_suffix) for t, im in zip(texts, images)]
    pil = [backbones.load_image(im, f" (item {first + i})") for i, im in enumerate(images) if im is not None]
    return processor(text=prompts, images=pil or None, padding=True, return_tensors="pt")


# -----------------------------------------------------------------------------
# 3. the model

class MetaEmbed(nn.Module):
    """Backbone VLM + R_q Query and R_c Candidate Meta Tokens (two sets, one table).

    Input: [image tokens; text tokens; M_q; M_c]. E_q = last-layer states at the M_q positions,
    E_c = those at the M_c positions, optionally projected, L2-normalised. Attention is causal,
    so a query needs only M_q appended (M_c comes after and cannot change E_q)."""

    def __init__(self, config, backbone, processor):
        super().__init__()
        self.config, self.backbone, self.processor = config, backbone, processor
        hidden = backbone.config.get_text_config().hidden_size
        # the Meta Tokens start at the scale of the word embeddings
        std = backbone.get_input_embeddings().weight.detach().float().std().item()
        self.meta_tokens = nn.Parameter(torch.randn(config.num_query_tokens + config.num_candidate_tokens,
                                                    hidden) * std)        # (R_q + R_c, H): M_q, then M_c
        self.proj = nn.Linear(hidden, config.proj_dim) if config.proj_dim else None
        self.dim = config.proj_dim or hidden                              # D

    def meta_states(self, inputs: dict, R: int) -> torch.Tensor:
        """Append meta_tokens[:R] to every row; -> last-layer states at those positions (B, R, H)."""
        dev = self.device
        ids = inputs["input_ids"].to(dev)                                  # (B, L), left-padded
        B = ids.shape[0]
        ids = torch.cat([ids, ids.new_full((B, R), self.processor.tokenizer.pad_token_id)], 1)  # (B, L + R)
        mask = torch.cat([inputs["attention_mask"].to(dev), ids.new_ones(B, R)], 1)
        types = inputs.get("mm_token_type_ids")
        types = (ids == self.backbone.config.image_token_id).long() if types is None else \
            torch.cat([types.to(dev), ids.new_zeros(B, R)], 1)             # meta tokens are text
        grid = inputs.get("image_grid_thw")
        grid = grid.to(dev) if grid is not None else None
        # M-RoPE positions from input_ids: the meta tokens continue the 1-D text count after the
        # last real token (passing inputs_embeds alone would give wrong positions)
        position_ids, _ = self.base_model().get_rope_index(ids, mm_token_type_ids=types,
                                                           image_grid_thw=grid, attention_mask=mask)
        embeds = self.backbone.get_input_embeddings()(ids)                 # (B, L + R, H)
        meta = self.meta_tokens[:R].to(embeds.dtype).expand(B, -1, -1)     # (B, R, H)
        embeds = torch.cat([embeds[:, :-R], meta], 1)
        pixels = inputs.get("pixel_values")
        # Qwen2/2.5-VL take input_ids beside inputs_embeds (the ids place the image); Qwen3-VL and
        # Qwen3.5 refuse both and find the image placeholders by their embedding
        ids = None if backbones.family_of(self.base_model()).embeds_only else ids
        out = self.backbone(input_ids=ids, inputs_embeds=embeds, attention_mask=mask,
                            position_ids=position_ids, mm_token_type_ids=types,
                            pixel_values=pixels.to(dev) if pixels is not None else None,
                            image_grid_thw=grid, use_cache=False)
        return out.last_hidden_state[:, -R:]                               # (B, R, H)

    def embed(self, inputs: dict, side: str) -> torch.Tensor:
        """Processor tensors -> (B, R, D) unit vectors; side 'query' (R = R_q) or 'candidate' (R_c).

        Query: [x; M_q] -> E_q. Candidate: [x; M_q; M_c] -> E_c at the M_c positions."""
        R_q, R_c = self.config.num_query_tokens, self.config.num_candidate_tokens
        if side == "query":
            h = self.meta_states(inputs, R_q)                              # (B, R_q, H)
        else:
            h = self.meta_states(inputs, R_q + R_c)[:, R_q:]               # (B, R_c, H)
        if self.proj is not None:
            h = self.proj(h.to(self.proj.weight.dtype))                    # (B, R, D)
        return F.normalize(h.float(), dim=-1)                              # E / ||E|| per vector

    def forward(self, query_inputs: dict | None = None, candidate_inputs: dict | None = None) -> tuple:
        """One forward through the wrapper (so DDP / FSDP see it): -> (E_q (B, R_q, D) or None,
        E_c (B_c, R_c, D) or None), for whichever inputs are given."""
        return (self.embed(query_inputs, "query") if query_inputs is not None else None,
                self.embed(candidate_inputs, "candidate") if candidate_inputs is not None else None)

    # -- the interface others rely on (the README's "Using a trained model"); behind it: section 5 --
    def encode_queries(self, texts: list[str], images: list | None = None, batch_size: int = 32, progress: bool = False,
                       out: torch.Tensor | None = None, workers: int = 0) -> torch.Tensor:
        """texts (N,) and images (N,: PIL, path or None) -> E_q (N, R_q, D) unit rows, float32 (or written
        into `out`, any dtype). A budget's r_q query vectors are the prefix E_q[:, :r_q].

        >>> model = MetaEmbed.from_backbone("tiny", num_query_tokens=4, num_candidate_tokens=8)
        >>> E_q = model.encode_queries(["red top left", "blue center"])
        >>> tuple(E_q.shape[:2]), E_q.shape[2] == model.dim, bool(torch.allclose(E_q.norm(dim=-1), torch.ones(2, 4)))
        ((2, 4), True, True)"""
        return encode(self, texts, images, "query", out, ScoringOptions(batch_size, workers, progress))

    def encode_candidates(self, texts: list[str], images: list | None = None, batch_size: int = 32,
                          progress: bool = False, out: torch.Tensor | None = None, workers: int = 0) -> torch.Tensor:
        """-> E_c (N, R_c, D) unit rows, float32 (or written into `out`, any dtype)."""
        return encode(self, texts, images, "candidate", out, ScoringOptions(batch_size, workers, progress))

    @classmethod
    def from_backbone(cls, name: str = "tiny", seed: int = 0, **kwargs) -> MetaEmbed:
        """Backbone by alias / hub id / folder, with fresh meta tokens (seeded)."""
        return backbones.build(cls, MetaEmbedConfig(backbone=name, **kwargs), seed)

    @classmethod
    def from_pretrained(cls, path: str) -> MetaEmbed:
        """A saved folder (save_pretrained's), every file checked first."""
        return load(cls, path)

    def save_pretrained(self, path: str, state_dict: dict | None = None, budget: str | None = None) -> None:
        """metaembed.json, model.safetensors, the backbone config and processor: see save()."""
        save(self, path, state_dict, budget)

    def set_image_bounds(self, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        """Change the image bounds (pixels) of this model's processor; kept in its config."""
        backbones.set_image_bounds(self.processor, min_pixels, max_pixels)
        self.config.min_pixels = min_pixels or self.config.min_pixels
        self.config.max_pixels = max_pixels or self.config.max_pixels

    def prepare(self, texts: list[str], images: list | None = None, side: str = "query") -> dict:
        return prepare(self.processor, texts, images, side, query_suffix=self.config.query_suffix)

    def base_model(self) -> nn.Module:
        """The backbone without its LoRA wrapper (peft's PeftModel), if any."""
        return getattr(self.backbone, "get_base_model", lambda: self.backbone)()

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """What training changes: meta tokens, projection, and LoRA adapters or the full backbone."""
        return {k: v for k, v in self.named_parameters() if v.requires_grad}

    device = property(lambda self: self.meta_tokens.device, doc="torch.device: where the model's weights are")


# -----------------------------------------------------------------------------
# 4. the MMR loss

def group_losses(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None, groups: Groups = GROUPS,
                 temperature: float = TEMPERATURE, offset: int = 0, neg_mask: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE_g of each Matryoshka group g = (r_q, r_c) -> (|G|,).

    q (B, R_q, D); pos (B', R_c, D), B' >= B, the positive of query u at row offset + u (other
    rows: in-batch negatives, e.g. other ranks' positives); neg None, (B, R_c, D) or
    (B, K, R_c, D): each query's OWN hard negatives; neg_mask (B, K) bool, False = no negative
    there (its logit is dropped). For each group:
        s_g(q, c) = sum_{i<=r_q} max_{j<=r_c} <E_q^i, E_c^j>       (prefix MaxSim)
        L_g = InfoNCE over logits s_g / tau (positive, other positives, own negatives)"""
    B = q.shape[0]
    if pos.shape[0] < offset + B:
        raise ValueError(f"pos has {pos.shape[0]} rows, fewer than offset {offset} + {B} queries")
    if neg is not None and neg.dim() == 3:
        neg = neg[:, None]                                                 # (B, K, R_c, D)
    labels = torch.arange(B, device=q.device) + offset                    # query u's positive
    losses = []
    for rq, rc in groups:
        qg = q[:, :rq]                                                     # (B, r_q, D)
        logits = maxsim_reference(qg, pos[:, :rc])                         # (B, B'): s_g(q_u, c_v)
        if neg is not None:
            s = maxsim_pairwise(qg, neg[:, :, :rc])                        # (B, K): u's own negatives
            if neg_mask is not None:
                s = s.masked_fill(~neg_mask.to(s.device, torch.bool).view(s.shape), float("-inf"))
            logits = torch.cat([logits, s], 1)                             # (B, B' + K)
        losses.append(F.cross_entropy(logits / temperature, labels))      # InfoNCE_g
    return torch.stack(losses)                                             # (|G|,)


def weighted_mean(losses: torch.Tensor, weights: tuple[float, ...] | None = None) -> torch.Tensor:
    """L = sum_g w_g L_g / |G|   (w_g = 1: the mean over groups, as the official code); losses (|G|,)."""
    weights = weights or [1.0] * len(losses)
    return sum(w * l for w, l in zip(weights, losses)) / len(losses)


def matryoshka_loss(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None, groups: Groups = GROUPS,
                    temperature: float = TEMPERATURE, weights: tuple[float, ...] | None = None,
                    offset: int = 0) -> torch.Tensor:
    """The Matryoshka Multi-Vector Retrieval loss, a scalar: L = sum_g w_g InfoNCE_g / |G| over
    the groups' prefix MaxSim scores (group_losses has the shapes, and the mask of missing negatives).

    >>> q = F.normalize(torch.randn(4, 16, 8), dim=-1); pos = q.new_zeros(4, 64, 8); pos[:, :16] = q
    >>> L = matryoshka_loss(q, pos); L.shape, float(L) < float(matryoshka_loss(q, pos.roll(1, 0)))
    (torch.Size([]), True)"""
    return weighted_mean(group_losses(q, pos, neg, groups, temperature, offset), weights)


# -----------------------------------------------------------------------------
# 5. using the model: the budget syntax, encoding in batches, construction, save / load
# (the machinery behind the interface; the files are machinery/checkpoints.py's)

def budget_groups(groups: Groups, R_q: int, R_c: int) -> tuple[Budget, ...]:
    """The groups a budget number names: the model's own, then the paper's that fit in (R_q, R_c)
    (so an ablation trained on (16, 64) alone is still served at budget 1 = (1, 1), everywhere)."""
    groups = tuple(Budget(*g) for g in groups)
    return groups + tuple(Budget(*g) for g in GROUPS if g not in groups and g[0] <= R_q and g[1] <= R_c)


def parse_budget(spec: str | int | tuple[int, int], config: MetaEmbedConfig | None = None,
                 stored: list[int] | None = None, name: str = "budget", groups: Groups | None = None) -> Budget:
    """One budget -> Budget by MetaEmbedConfig.budget. config: the model's (default: the paper's
    16 x 64 with GROUPS; groups=...: those groups, R_q x R_c their largest)."""
    return _config_of(config, groups).budget(spec, stored, name)


def parse_budgets(spec: str, config: MetaEmbedConfig | None = None, stored: list[int] | None = None,
                  groups: Groups | None = None) -> list[Budget]:
    """'1,4,16,64' -> [(1, 1), (2, 4), (8, 16), (16, 64)]: test-time budgets, each by parse_budget's rule.

    >>> [str(b) for b in parse_budgets("1,4,16,64")]
    ['1x1', '2x4', '8x16', '16x64']"""
    config = _config_of(config, groups)
    budgets = list(dict.fromkeys(config.budget(part, stored) for part in str(spec).replace(" ", "").split(",") if part))
    if not budgets:
        raise ValueError(f"no budget given in {spec!r}")
    return budgets


def _config_of(config, groups):
    groups = GROUPS if groups is None else groups
    return config or MetaEmbedConfig(num_query_tokens=max(g[0] for g in groups),
                                     num_candidate_tokens=max(g[1] for g in groups), groups=groups)


@torch.no_grad()
def encode(model: MetaEmbed, texts: list[str], images: list | None, side: str, out: torch.Tensor | None = None,
           options: ScoringOptions | None = None) -> torch.Tensor:
    """Encode in batches straight into `out` (N, R, D): a preallocated tensor of any dtype (a
    bf16 index: half the memory, no float32 copy) or anything that takes `out[i:j] = x` (an
    on-disk index). Batches are prepared (images decoded, tokenized) in a DataLoader, in
    options.workers processes where > 0, pinned on CUDA, so the GPU does not wait on PIL."""
    options = options or ScoringOptions()
    batch_size, progress, workers = options.batch_size, options.progress, options.workers
    texts, images = check_encode_inputs(texts, images, batch_size)
    R = model.config.num_query_tokens if side == "query" else model.config.num_candidate_tokens
    N = len(texts)
    out = torch.empty(N, R, model.dim) if out is None else out
    if tuple(out.shape) != (N, R, model.dim):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(N, R, model.dim)}")
    prep = functools.partial(prepare, model.processor, side=side, query_suffix=model.config.query_suffix)
    loader = backbones.Batches(prep, texts, images, batch_size).loader(   # prepared in workers, pinned on CUDA
        workers, model.device.type == "cuda", progress and ("encode queries" if side == "query" else "encode candidates"))
    was_training = model.training
    model.eval()
    try:
        for i, inputs in zip(range(0, N, batch_size), loader):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
                e = model.embed(inputs, side)                           # (B, R, D) float32
            out[i:i + e.shape[0]] = e.to(out.dtype).cpu() if isinstance(out, torch.Tensor) else e
    finally:
        model.train(was_training)
    return out


def save(model: MetaEmbed, path: str, state_dict: dict | None = None, budget: str | None = None) -> None:
    """Folder: metaembed.json, model.safetensors (what was trained: the random `tiny` base
    whole, a hub base is reloaded by name), the backbone config and the processor; written
    whole or not at all. state_dict: a full state dict to save instead (FSDP gathers one).
    Also a sentence-transformers MultiVectorEncoder (machinery/st_format.py) of default `budget`."""
    c = model.config
    budget = c.budget(budget or (c.num_query_tokens, c.num_candidate_tokens), name="default budget")
    state = model.state_dict() if state_dict is None else state_dict
    if not model.config.offline:
        state = {k: state[k] for k in model.trained_parameters()}
    files = [model.base_model().config, model.processor.tokenizer, model.processor.image_processor]
    checkpoints.save_model(path, state, asdict(model.config), files, lambda f: st_format.write(f, model, budget))


def load(cls, path: str) -> MetaEmbed:
    """MetaEmbed.from_pretrained: the config and every file checked first, the backbone rebuilt,
    the trained weights loaded."""
    config = MetaEmbedConfig(**checkpoints.read_config(path))   # every file checked first
    model = backbones.assemble(cls, config, *backbones.load_saved(path, config))
    checkpoints.load_weights(model, path)
    return model


def load_model(path: str, tool: str, hint: str = "") -> tuple[MetaEmbed, str]:
    """A command-line tool's model: the checkpoint at `path` (or the newest in a train.py --out
    folder; checkpoints.find_for_tool) -> (MetaEmbed, the checkpoint folder)."""
    found = checkpoints.find_for_tool(path, tool, hint)
    return MetaEmbed.from_pretrained(found), found
