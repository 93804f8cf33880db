"""The machinery, below the paper's files: what MetaEmbed needs to run, but not what it is. It
imports nothing from the layers above (the paper at the root, the applications in apps/ and bench/).

    backbones     aliases, the offline `tiny` Qwen2-VL built in code, loading, LoRA, images
    checkpoints   integrity checks, latest / resolve, atomic writes, optimizer state, pruning; train.py's run
                  folder rules (resume, SAFE_TO_CHANGE, --out set-up) and its log
    distributed   torchrun set-up, DDP / FSDP2 wrapping, the all-gather with gradient
    cpu_kernel    the fused C MaxSim kernel (maxsim.c): build, self-check, measured dispatch
    triton_kernel the fused Triton MaxSim kernel (CUDA; TRITON_INTERPRET=1 on the CPU for tests)
    hub           MMEB / ViDoRe / training sets through `datasets`, the official mixture
    precision     the one precision vocabulary: float32, bfloat16 (bf16), float16, int8, binary
    options       ScoringOptions: how a tool encodes and scores (batches, workers, precision, index folder, backend)
    index         the one on-disk index format, its precisions (evaluate.py --index-dir, apps/search_index.py)
    mteb_adapter  MetaEmbed as an mteb encoder (evaluate.py --mteb, evaluate.mteb_model; MaxSim given by the caller)
    report        evaluate.py's summary per budget, results table and plot
    st_format     every saved folder a sentence-transformers MultiVectorEncoder: its code written from the
                  project's own at save time, modules.json, the model card
    st_module     the sentence-transformers module class that code ends with (never imported here)
    checks        argument, path and input checks (one line that names the problem); the MaxSim verification reference
"""
