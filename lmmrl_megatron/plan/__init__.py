"""lmmrl-plan: will a run fit in GPU memory at its layout, phase by phase, and roughly how fast.

    gpus.py    the GPU catalogue (memory, bf16 peak, HBM bandwidth)
    params.py  parameters per rank of each pipeline stage, from config.json (analytic; meta.py checks it)
    layout.py  the layout checks (TP / heads / KV heads, PP stages, vision on stage 0, world sizes, engines)
    memory.py  the memory model: bytes per GPU per role and phase, term by term
    report.py  the per-phase table, the verdict with the knobs, and the rough step time
    meta.py    the model built on the meta device under a fake process group (exact per-rank counts)
"""
