"""The sentence-transformers module of a saved MetaEmbed folder: the class its code file ends with.

machinery/st_format.py writes each checkpoint folder's metaembed_st.py from the project's own code
(metaembed.py and the machinery it uses, copied verbatim) followed by this class, so that
    MultiVectorEncoder(folder, trust_remote_code=True)
loads the checkpoint in a process without this repository. The project never imports this file:
the name it uses beyond its imports (MetaEmbed) is one the generated file defines
above it, from metaembed.py's namespace.
"""
import os
import shutil

import torch
from sentence_transformers.base.modules import InputModule


class MetaEmbedModule(InputModule):
    """A MetaEmbed checkpoint as the one module of a MultiVectorEncoder: each input -> the first r of
    its unit vectors (B, r, D), the Matryoshka prefix. encode_query(..., num_vectors=r_q) and
    encode_document(..., num_vectors=r_c) pick r; without it, the folder's default budget."""
    config_file_name = "metaembed_st.json"      # {"budget": [r_q, r_c]} (config.json is the backbone's)
    config_keys = ["budget"]
    forward_kwargs = {"task", "num_vectors"}
    save_in_root = True
    # what MultiVectorEncoder.save writes itself; the rest of the folder is the checkpoint
    OWN_FILES = ("modules.json", "config_sentence_transformers.json", "README.md", config_file_name,
                 "optimizer.safetensors", "trainer_state.json")       # (and a training run's state)

    def __init__(self, model, path, budget):
        super().__init__()
        self.model, self.path, self.budget = model, path, [int(budget[0]), int(budget[1])]
        self.tokenizer, self.processor = model.processor.tokenizer, model.processor

    @property
    def modalities(self):
        # "message": how sentence-transformers names a batch that mixes these (chat messages are refused below)
        return ["text", "image", ("image", "text"), "message"]

    def get_embedding_dimension(self):
        return self.model.dim                                              # D

    @classmethod
    def load(cls, model_name_or_path, subfolder="", token=None, cache_folder=None, revision=None,
             local_files_only=False, **kwargs):
        """The folder (or the hub repo, downloaded) -> MetaEmbed.from_pretrained, as the repository loads it."""
        path = cls.load_dir_path(model_name_or_path, subfolder, token=token, cache_folder=cache_folder,
                                 revision=revision, local_files_only=local_files_only)
        settings = cls.load_config(path)
        model = MetaEmbed.from_pretrained(path)
        model.eval()
        R = (model.config.num_query_tokens, model.config.num_candidate_tokens)
        return cls(model, path, settings.get("budget") or R)

    def preprocess(self, inputs, prompt=None, task=None, **kwargs):
        """Each input a text, a PIL image (or a path / bytes in a dict) or {"image": .., "text": ..} -> the
        paper's prompt, a query's (task 'query') or a candidate's, prepared as MetaEmbed.prepare does.
        A prompt given to encode_* goes before the text."""
        texts, images = [], []
        for x in inputs:                   # (sorted by length: an input's place here is not the caller's)
            if isinstance(x, str):
                image, text = None, x
            elif isinstance(x, dict) and x and set(x) <= {"image", "text"}:
                image, text = x.get("image"), x.get("text") or ""
            elif hasattr(x, "convert") and hasattr(x, "size"):         # a PIL image
                image, text = x, ""
            else:
                raise TypeError(f"an input {str(x)[:60]!r} is a {type(x).__name__}, not a text, a PIL image or "
                                f"an {{'image': .., 'text': ..}} dict")
            texts.append((prompt or "") + text)
            images.append(image)
        side = "query" if task == "query" else "candidate"
        return dict(self.model.prepare(texts, images, side))

    def forward(self, features, task=None, num_vectors=None, **kwargs):
        side = "query" if task == "query" else "candidate"
        R = self.model.config.num_query_tokens if side == "query" else self.model.config.num_candidate_tokens
        r = self.budget[0 if side == "query" else 1] if num_vectors is None else num_vectors
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= R:
            raise ValueError(f"num_vectors={r!r}: a {side} of this model has {R} vectors; give a whole number "
                             f"from 1 to {R} (the Matryoshka prefix)")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.model.device.type == "cuda"):   # as encode()
            e = self.model.embed(features, side)[:, :r]                    # (B, r, D) unit vectors, float32
        return {"token_embeddings": e, "attention_mask": torch.ones(e.shape[:2], dtype=torch.long, device=e.device)}

    def save(self, output_path, *args, safe_serialization=True, **kwargs):
        """The checkpoint's files as loaded (this module loads and encodes; MetaEmbed trains in its repository)."""
        for name in os.listdir(self.path):
            src = os.path.join(self.path, name)
            if os.path.isfile(src) and name not in self.OWN_FILES and not name.endswith(".py") and \
                    os.path.abspath(src) != os.path.abspath(os.path.join(output_path, name)):
                shutil.copy2(src, os.path.join(output_path, name))
        self.save_config(output_path)
