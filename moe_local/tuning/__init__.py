"""Router tuning, from task data to an adapter and its evaluation, written once against
``moe_local.loaded.TuningOps``:

    tasks.py         task data -> records (formats.py reads files, layouts.py maps their columns, records.py
                     checks them) and how they are asked (format, few-shot examples)
    data.py          the prompt renderer (mc, rc, few-shot), candidate encoding, padded batches
    embeddings.py    task embeddings: precomputed .npy, or computed with a local sentence-transformers model
    prepare.py       one base-model pass -> the routing bank (bank.py) and the prefix cache (prefix_cache.py)
    roma.py          tuned layers, neighbours, Gaussian weights, λ warm-up, the loss
    optim.py         AdamW on float32 numpy routers
    tune.py          settings, setup, one step, the epochs; report.py reports them
    folder.py        the output folder: what may be replaced, checkpoints, --resume
    adapter.py       router adapter folders (mlx-lm compatible)
    evaluate.py      multiple-choice accuracy (acc, acc_norm), the oracle and its wrong-label control
"""
