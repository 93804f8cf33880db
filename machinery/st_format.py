"""A saved MetaEmbed folder is also a sentence-transformers MultiVectorEncoder folder:

    from sentence_transformers import MultiVectorEncoder
    m = MultiVectorEncoder(folder, trust_remote_code=True)       # no repository needed
    m.encode_query(texts, num_vectors=r_q); m.encode_document(images_texts_or_dicts, num_vectors=r_c)

write() adds to what save() writes: modules.json and config_sentence_transformers.json (one module,
MaxSim), metaembed_st.json (the default budget), the model card README.md, and metaembed_st.py, the
module's code. That file is the project's own code, not a second implementation: module_code()
copies, verbatim, every definition of the paper's file (metaembed.py) and of the machinery that
loading and encoding reach from the module class (machinery/st_module.py), found by following the
names each uses, then that class. Writes nothing itself but files in the folder it is given.
"""
import ast
import hashlib
import json
import os
import sys

from machinery import backbones, checkpoints
from machinery.precision import Precision

CODE_FILE = "metaembed_st.py"
MODULE_CLASS = "MetaEmbedModule"
SETTINGS_FILE = "metaembed_st.json"
CARD_FILE = "README.md"
MODEL_ID_PLACEHOLDER = "multi_vector_encoder_model_id"     # MultiVectorEncoder.push_to_hub puts the repo id there
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the repository's construction from a backbone and its saving are not the folder's: a call says so
LEFT_OUT = ("build", "save")
# the machinery files' order in the folder's code (the lower first: a top-level line may use what is above it)
ORDER = ("machinery.precision", "machinery.options", "machinery.checks", "machinery.backbones", "machinery.checkpoints")


def write(folder, model, budget, paper=None, results=None):
    """The sentence-transformers files of a checkpoint folder being written (model: the MetaEmbed,
    budget: its default (r_q, r_c), paper: the module that defines MetaEmbed, by default the model's)."""
    paper = paper or sys.modules[type(model).__module__]
    import torch
    import transformers
    versions = {"transformers": transformers.__version__, "pytorch": torch.__version__}
    try:                                         # writing the folder needs no sentence-transformers; loading it does
        import sentence_transformers
        versions["sentence_transformers"] = sentence_transformers.__version__
    except ImportError:
        pass
    with open(os.path.join(folder, CODE_FILE), "w") as f:
        f.write(module_code(paper, model.config.lora))
    with open(os.path.join(folder, "modules.json"), "w") as f:
        json.dump([{"idx": 0, "name": "0", "path": "", "type": f"{CODE_FILE[:-3]}.{MODULE_CLASS}"}], f, indent=2)
    with open(os.path.join(folder, "config_sentence_transformers.json"), "w") as f:
        json.dump({"model_type": "MultiVectorEncoder", "__version__": versions, "prompts": {"query": "", "document": ""},
                   "default_prompt_name": None, "similarity_fn_name": "maxsim"},   # MaxSim: the sum over query
                  f, indent=2)                                                     # vectors, not the mean
    with open(os.path.join(folder, SETTINGS_FILE), "w") as f:
        json.dump({"budget": list(budget)}, f)
    with open(os.path.join(folder, CARD_FILE), "w") as f:
        f.write(model_card(model.config, model.dim, budget, results))


# -----------------------------------------------------------------------------
# the module's code, from the project's own

def parse(name, text, fallback=None):
    """A source file -> its top-level definitions and imports by the name they bind."""
    tree, defs, imports = ast.parse(text), {}, {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    defs[t.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
            for a in node.names:
                bound = a.asname or a.name.split(".")[0]
                imports[bound] = (node, a)
    return {"name": name, "text": text, "lines": text.splitlines(), "defs": defs, "imports": imports,
            "fallback": fallback}


def is_project(module):
    top = module.split(".")[0]
    return os.path.isfile(os.path.join(ROOT, top + ".py")) or os.path.isdir(os.path.join(ROOT, top))


def module_code(paper, lora=False):
    """metaembed_st.py: the definitions the module class reaches, copied from their files in the
    files' order (the machinery's first, then the paper's), then the class. Only the paper's file and
    machinery/ are carried: a name from another project file (maxsim.py, data.py) becomes a stub that
    names it, as do LEFT_OUT, so saving never fails on it; the tests load every folder they save."""
    module_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "st_module.py")
    files = {paper.__name__: paper.__file__, "machinery.st_module": module_file}
    sources = {"machinery.st_module": parse("machinery.st_module", open(module_file).read(), fallback=paper.__name__)}
    left_out = set(LEFT_OUT) | (set() if lora else {"add_lora"})     # peft only where LoRA is used

    def source(module):
        """The parsed file of a module the folder's code carries (the paper's, machinery's), else None."""
        if module not in sources:
            path = files.get(module) or os.path.join(ROOT, *module.split(".")) + ".py"
            if not (module == paper.__name__ or module.startswith("machinery.")) or not os.path.isfile(path):
                return None
            files[module], sources[module] = path, parse(module, open(path).read())
        return sources[module]

    def resolve(src, n):
        """A name used in src -> ('def', module, name) | ('ext', module, name) | ('alias', module) |
        ('stub', name, why) | None."""
        s = sources[src]
        if n in s["defs"]:
            return ("def", src, n)
        if n in s["imports"]:
            node, a = s["imports"][n]
            target = a.name if isinstance(node, ast.Import) else f"{node.module}.{a.name}"
            if not is_project(target):
                return ("ext", src, n)
            if source(target):
                return ("alias", target)
            if isinstance(node, ast.ImportFrom) and source(node.module):
                return resolve(node.module, a.name)
            return ("stub", n, f"{src} takes it from {target}, which this folder's code does not carry")
        return resolve(s["fallback"], n) if s["fallback"] else None     # a local, a parameter or a builtin

    source(paper.__name__)

    wanted, ext, aliases, stubs = set(), set(), set(), {}
    todo = [("machinery.st_module", MODULE_CLASS)]
    while todo:
        src, name = todo.pop()
        if (src, name) in wanted:
            continue
        if name in left_out:
            stubs[name] = "this checkpoint has no LoRA adapters (so peft need not be installed)" if name == "add_lora" \
                else "the repository's construction and saving, not this folder's"
            continue
        wanted.add((src, name))
        for node in ast.walk(sources[src]["defs"][name]):
            found = None
            if isinstance(node, ast.Name):
                found = resolve(src, node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                base = resolve(src, node.value.id)
                if base and base[0] == "alias":
                    aliases.add(node.value.id)
                    found = ("def", base[1], node.attr)
                    if node.attr not in sources[base[1]]["defs"]:
                        raise ValueError(f"{CODE_FILE}: {src} uses {node.value.id}.{node.attr}, not defined there")
            if found and found[0] == "def":
                todo.append(found[1:])
            elif found and found[0] == "ext":
                ext.add(found[1:])
            elif found and found[0] == "alias":
                aliases.add(node.id)
            elif found and found[0] == "stub":
                stubs[found[1]] = found[2]
    names = {}
    for src, name in [*wanted, *((None, n) for n in stubs)]:
        if names.setdefault(name, src) != src:
            raise ValueError(f"{CODE_FILE}: {name} is defined in both {names[name]} and {src}")

    imports = {}
    for src, n in ext:
        node, a = sources[src]["imports"][n]
        line = f"import {a.name}" + (f" as {a.asname}" if a.asname else "") if isinstance(node, ast.Import) else \
            f"from {node.module} import {a.name}" + (f" as {a.asname}" if a.asname else "")
        if imports.setdefault(n, line) != line:
            raise ValueError(f"{CODE_FILE}: {n} is imported as both {imports[n]!r} and {line!r}")
    merged = {}
    for line in sorted(set(imports.values())):
        if line.startswith("from ") and " as " not in line:
            module, what = line[5:].split(" import ")
            merged.setdefault(f"from {module} import", []).append(what)
        else:
            merged[line] = []
    import_lines = sorted((k + (" " + ", ".join(sorted(v)) if v else "") for k, v in merged.items()),
                          key=lambda line: (line.startswith("from "), line))

    digest = lambda t: hashlib.sha256(t.encode()).hexdigest()[:12]  # noqa: E731
    out = ['"""MetaEmbed as a sentence-transformers module: this checkpoint folder\'s model code.',
           "",
           "Written at save time by the MetaEmbed repository's machinery/st_format.py from the repository's own code:",
           "each definition below is copied verbatim from the file named above it (sha256 of that file's text).",
           "Do not edit it: change the repository and save again. Loaded by",
           "    MultiVectorEncoder(folder, trust_remote_code=True)",
           '"""',
           "from __future__ import annotations   # the copied annotations name classes defined further down",
           "import sys",
           *[line for line in import_lines if line != "import sys"],
           "",
           f"{' = '.join(sorted(aliases) + ['sys.modules[__name__]'])}   # the repository's modules are this one file"
           if aliases else ""]
    machinery = sorted((m for m in sources if m.startswith("machinery.") and m != "machinery.st_module"),
                       key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
    for src in [*machinery, paper.__name__, "machinery.st_module"]:
        s = sources[src]
        nodes = sorted({id(s["defs"][n]): s["defs"][n] for (m, n) in wanted if m == src}.values(), key=lambda n: n.lineno)
        if not nodes:
            continue
        path = os.path.relpath(files[src], ROOT)
        out += ["", "", f"# {'-' * 99}", f"# from {path} ({digest(s['text'])})"]
        for node in nodes:
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            while start > 1 and s["lines"][start - 2].lstrip().startswith("#"):
                start -= 1                                        # the comment lines just above it
            out += ["", ""] + s["lines"][start - 1:node.end_lineno]
    if stubs:
        out += ["", "", f"# {'-' * 99}", "# left out of this folder (each says why)", ""]
        for name in sorted(stubs):
            out += ["", f"def {name}(*args, **kwargs):",
                    f"    raise NotImplementedError({f'{name}() is left out of this folder: {stubs[name]}'!r})", ""]
    return "\n".join(out).rstrip() + "\n"


# -----------------------------------------------------------------------------
# the model card

RESULTS_BEGIN, RESULTS_END = "<!-- metaembed results -->", "<!-- /metaembed results -->"
CITATION = """@inproceedings{xiao2026metaembed,
  title     = {MetaEmbed: Scaling Multimodal Retrieval at Test-Time with Flexible Late Interaction},
  author    = {Xiao, Zilin and others},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2026},
  eprint    = {2509.18095},
  archivePrefix = {arXiv}
}"""


def model_card(config, dim, budget, results=None):
    """README.md in the hub's model-card style: what the model is, the three lines that load it,
    its budgets with bytes per candidate, the results when evaluated, license, citation."""
    c = config if isinstance(config, dict) else {k: getattr(config, k) for k in config.__dataclass_fields__}
    R_q, R_c, offline = c["num_query_tokens"], c["num_candidate_tokens"], backbones.is_offline(c["backbone"])
    base = None if offline else backbones.BACKBONES.get(c["backbone"], c["backbone"])
    hub_base = base if base and backbones.looks_like_hub_id(base) else None
    groups = sorted({*map(tuple, c["groups"]), tuple(budget)}, key=lambda g: (g[1], g[0]))
    bf16, fp32 = Precision.BFLOAT16.vector_bytes(dim), Precision.FLOAT32.vector_bytes(dim)
    rows = [f"| {rq}x{rc}{' (default)' if (rq, rc) == tuple(budget) else ''} | {rc} | {rc * bf16:,} | "
            f"{rc * fp32:,} | {2 * rq * rc * dim:,} |" for rq, rc in groups]
    what = "the offline tiny backbone (random base weights, built in code: a test model, not a retriever)" if offline \
        else f"`{base}`" + (" with LoRA adapters" if c.get("lora") else "")
    return "\n".join([
        "---", "library_name: sentence-transformers", "pipeline_tag: visual-document-retrieval",
        *([f"base_model: {hub_base}"] if hub_base else []), "license: other",
        "tags:", *[f"- {t}" for t in ("sentence-transformers", "multi-vector", "late-interaction", "metaembed",
                                      "matryoshka", "multimodal-retrieval")], "---", "",
        f"# MetaEmbed on {c['backbone']}", "",
        f"A MetaEmbed multi-vector retrieval model (Xiao et al., arXiv:2509.18095) on {what}. {R_q} learnable Query "
        f"and {R_c} Candidate Meta Tokens are appended to every input (texts, images, or both); the last-layer states "
        f"at those positions, L2-normalised, are its vectors (D = {dim}). Matryoshka Multi-Vector Retrieval training "
        "orders them, so the first r_q query and r_c candidate vectors are an embedding at every budget: one "
        "encoding, and the budget chosen at search time. Score: MaxSim, the sum over query vectors of each one's "
        "best candidate vector.", "",
        "## Usage", "", "```python", "from sentence_transformers import MultiVectorEncoder",
        f"model = MultiVectorEncoder(\"{MODEL_ID_PLACEHOLDER}\", trust_remote_code=True)   # the folder, or its hub id",
        "scores = model.similarity(model.encode_query([\"a query\"], num_vectors=2),",
        "                          model.encode_document([image, \"a text\", {\"image\": image, \"text\": \"a caption\"}], num_vectors=4))",
        "```", "",
        "Queries and documents are texts, PIL images or `{\"image\": ..., \"text\": ...}` dicts. `num_vectors` takes the "
        f"Matryoshka prefix (1 to {R_q} for a query, 1 to {R_c} for a document); without it the default budget, "
        f"{budget[0]}x{budget[1]}, is used (so in mteb: `mteb.evaluate(model, tasks)`). The code is in "
        f"`{CODE_FILE}` (hence `trust_remote_code`): the MetaEmbed repository's own, written at save time; it needs "
        "torch, transformers, Pillow and sentence-transformers" + (", and peft for the LoRA adapters" if c.get("lora")
                                                                 else "") + ".", "",
        "## Budgets", "",
        "| budget r_q x r_c | vectors per candidate | bytes per candidate (bf16) | bytes (float32) | FLOPs per pair |",
        "|---|---|---|---|---|", *rows, "",
        "## Results", "", RESULTS_BEGIN, results_table(results), RESULTS_END, "",
        "## Training", "",
        f"Groups (r_q, r_c): {', '.join(f'{a}x{b}' for a, b in c['groups'])}; temperature {c['temperature']}; "
        + (f"LoRA r={c['lora_r']}, alpha={c['lora_alpha']}, dropout {c['lora_dropout']}" if c.get("lora")
           else "full fine-tuning") + f"; backbone weights in {c['dtype']}; images capped at "
        + (f"{c['max_pixels']:,} pixels." if c.get("max_pixels") else "the processor's bound."), "",
        "## License", "",
        (f"The weights adapt `{base}`: its license applies." if base else
         "Random base weights built in code; no third-party weights."), "",
        "## Citation", "", "```bibtex", CITATION, "```", ""])


def results_table(results):
    if not results:
        return ("Not evaluated yet: `python evaluate.py --checkpoint FOLDER --card` writes the table here "
                "(MetaEmbed repository).")
    h, s = results["headline"], results["summary"]
    tasks = list(results["tasks"])
    lines = [f"{results['benchmark']}, {h} (%) by budget (evaluated with the MetaEmbed repository's evaluate.py):", "",
             "| budget | " + " | ".join([*tasks, "overall", "bytes per candidate"]) + " |",
             "|---" * (len(tasks) + 3) + "|"]
    for b in results["budgets"]:
        lines.append(f"| {b} | " + " | ".join([*(f"{100 * results['tasks'][t][b][h]:.1f}" for t in tasks),
                                                f"{100 * s[b]['overall']:.1f}", f"{s[b]['bytes_per_candidate']:,}"]) + " |")
    return "\n".join(lines)


def write_results(folder, results):
    """evaluate.py --card: the results table into the folder's model card, in place."""
    path = os.path.join(folder, CARD_FILE)
    text = open(path).read() if os.path.isfile(path) else ""
    if RESULTS_BEGIN not in text or RESULTS_END not in text:
        raise ValueError(f"{path}: no MetaEmbed model card to write the results into (a checkpoint saved before "
                         f"model cards: MetaEmbed.from_pretrained(CK).save_pretrained(NEW_FOLDER) gives it one)")
    head, rest = text.split(RESULTS_BEGIN, 1)
    checkpoints.write_atomic(path, head + RESULTS_BEGIN + "\n" + results_table(results) + "\n" + RESULTS_END +
                             rest.split(RESULTS_END, 1)[1])
