"""Benchmark: one epoch of RoMA with the prefix cache vs the full model run at every step.

A random 16-layer Qwen3-MoE of small width, the last 5 MoE layers tuned. Both variants train the
same routers on the same batches from the same routing bank (made once, beforehand):

  cache  the frozen layers' output is computed once (its build time reported apart), each step
         runs the 5 tuned layers forward and backward;
  full   each step runs the whole model forward with only the routers trainable (what the
         released RoMA code does; autograd records nothing below the first tuned gate).

Each variant runs in its own process so that peak memory (CUDA: max allocated; CPU: peak RSS;
MLX: its allocator's peak over the training loop) belongs to it alone. The bound on the speed-up
counts layer passes: (16 fwd + 5 bwd) / (5 fwd + 5 bwd), with a backward costing two forwards:
26/15 = 1.73. Only the routers are trained, so the backward computes no weight gradients for the
experts and attention and costs nearer one forward, which moves the bound toward 21/10 = 2.1; both
are printed.

    python scripts/bench_tune.py [--device cuda --moe-impl grouped] [--samples 256]
    python scripts/bench_tune.py --backend mlx [--device gpu]     # MLX (the bank made by MLX too)

MLX on Linux is MLX's CPU build: its matmuls are several times slower than torch's here, so those
numbers say nothing about a Mac; only the cache-vs-full ratio on one backend carries over.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega"
).split()


def build_model(folder: Path, args) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    h = args.hidden
    config = Qwen3MoeConfig(
        hidden_size=h,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, h // 64),
        num_key_value_heads=max(1, h // 128),
        head_dim=64,
        vocab_size=args.vocab,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=h,
        intermediate_size=2 * h,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # a wider spread than the default init, so routing is not uniform
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.05)
    model.save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_experts"] = args.experts
    cfg["rope_theta"] = (cfg.get("rope_parameters") or {}).get("rope_theta", 1e6)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab,
        special_tokens=["<unk>", "<|end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20 + [" A B C D Answer:"] * 20, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|end|>", pad_token="<pad>"
    ).save_pretrained(str(folder))


def make_records(n: int, words: int, seed: int = 0):
    from moe_local.tuning.data import Record

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(words // 2, words + 1))  # ragged prompt lengths
        question = " ".join(rng.choice(WORDS, length)) + "?"
        choices = tuple(" ".join(rng.choice(WORDS, 3)) for _ in range(4))
        out.append(Record(question, choices, int(rng.integers(0, 4)), None, i + 1))
    return out


def settings(args, mode: str):
    from moe_local.tuning.tune import TuneSettings

    return TuneSettings(
        layers=args.tuned,
        epochs=1,
        batch_size=args.batch_size,
        lr=1e-3,
        lam_warmup=0,
        log_every=10**6,
        save_every=10**6,
        prefix_cache=mode,
        cache_budget_gb=1e6,
    )


def child(args) -> None:
    """One variant: tune one epoch from the shared bank, print the numbers as JSON."""
    from moe_local.tuning import bank as banks
    from moe_local.tuning.tune import tune

    work = Path(args.work)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = load(args, work / "model")
    records = make_records(args.samples, args.prompt_words)
    bank = banks.read_bank(work / "bank")
    if args.warmup:  # one short run first: kernels, allocator, thread pools
        few = records[: args.batch_size * 2]
        tune(
            model,
            few,
            None,
            settings(args, args.child),
            work / f"warm-{args.child}",
            bank=_sub_bank(bank, few),
            overwrite=True,
            progress="off",
        )
    model.reset_peak_memory()
    t0 = time.perf_counter()
    result = tune(
        model,
        records,
        None,
        settings(args, args.child),
        work / f"adapter-{args.child}",
        bank=bank,
        overwrite=True,
        progress="off",
    )
    wall = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "mode": args.child,
                "samples_per_s": result.samples_per_s,
                "train_s": result.train_s,
                "samples_per_cpu_s": args.samples / result.train_cpu_s,
                "train_cpu_s": result.train_cpu_s,
                "cache_s": result.cache_s,
                "wall_s": wall,
                "peak_mem_gb": result.peak_mem_gb,
                "steps": result.steps,
            }
        )
    )


def load(args, folder: Path):
    import moe_local

    device = args.device or ("cpu" if args.backend == "torch" else None)  # MLX: the GPU where there is one
    return moe_local.load(str(folder), backend=args.backend, device=device, moe_impl=args.moe_impl, dtype=args.dtype)


def _sub_bank(bank, records):
    """The bank rows of the first len(records) samples, as a bank for those records."""
    from moe_local.tuning import bank as banks
    from moe_local.tuning.prepare import records_sha256

    n = len(records)
    return banks.Bank(
        bank.correct[:n], bank.routing[:n], bank.embeddings[:n], {**bank.meta, "data_sha256": records_sha256(records)}
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--tuned", type=int, default=5)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=40)
    p.add_argument("--backend", default="torch", choices=("torch", "mlx"))
    p.add_argument("--device", default=None, help="torch: cpu (default), cuda; mlx: cpu, gpu (default where Metal is)")
    p.add_argument("--moe-impl", default="grouped")
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="Runs per variant, interleaved; the best is reported.")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    from moe_local.tuning import bank as banks
    from moe_local.tuning.prepare import prepare

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_model(work / "model", args)
        model = load(args, work / "model")
        records = make_records(args.samples, args.prompt_words)
        emb = np.random.default_rng(0).standard_normal((len(records), 32)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        t0 = time.perf_counter()
        bank = prepare(model, records, emb, args.tuned, args.batch_size, progress="off")
        prepare_s = time.perf_counter() - t0
        if not bank.correct.any():
            bank.correct[::2] = 1  # a random model: give the neighbour search successful samples
        banks.write_bank(work / "bank", bank)
        tokens = sum(len(model.tokenizer(r.question)["input_ids"]) for r in records) / len(records)
        device = model.device
        del model
        print(
            f"model: {args.layers} layers, hidden {args.hidden}, {args.experts} experts top-{args.top_k}; "
            f"tuning the last {args.tuned}; {args.samples} samples (~{tokens:.0f} question tokens), "
            f"batch {args.batch_size}; backend {args.backend}, device {device}, moe_impl {args.moe_impl}"
        )
        print(f"bank (base-model pass, both variants share it): {prepare_s:.2f} s; best of {args.repeats} runs below")
        runs = {"memory": [], "full": []}
        for _ in range(args.repeats):  # interleaved, so that load from other work hits both alike
            for mode in runs:
                cmd = [sys.executable, __file__, "--child", mode, "--work", str(work)] + sys.argv[1:]
                run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                if run.returncode != 0:
                    sys.exit(f"{mode} run failed:\n{run.stderr[-3000:]}")
                runs[mode].append(json.loads(run.stdout.strip().splitlines()[-1]))
    for mode, rs in runs.items():
        print(
            f"{mode:>6} runs, samples/s: "
            + ", ".join(f"{r['samples_per_s']:.1f}" for r in rs)
            + "; samples per CPU-second: "
            + ", ".join(f"{r['samples_per_cpu_s']:.1f}" for r in rs)
        )
    c, f = (max(rs, key=lambda r: r["samples_per_s"]) for rs in runs.values())
    c = dict(c, cache_s=min(r["cache_s"] for r in runs["memory"]))
    print(f"{'variant':<34}{'samples/s':>10}{'epoch s':>10}{'peak GB':>10}")
    print(
        f"{f'prefix cache ({args.tuned} layers fwd+bwd)':<34}{c['samples_per_s']:>10.1f}{c['train_s']:>10.2f}"
        f"{c['peak_mem_gb']:>10.3f}"
    )
    print(
        f"{'full model fwd, routers trainable':<34}{f['samples_per_s']:>10.1f}{f['train_s']:>10.2f}"
        f"{f['peak_mem_gb']:>10.3f}"
    )
    print(
        f"prefix cache build (prefix-only pass, reported apart): {c['cache_s']:.2f} s; "
        f"epoch incl. build {c['train_s'] + c['cache_s']:.2f} s vs {f['train_s']:.2f} s"
    )
    L, T = args.layers, args.tuned
    bound = (L + 2 * T) / (T + 2 * T)
    cpu_c = max(r["samples_per_cpu_s"] for r in runs["memory"])
    cpu_f = max(r["samples_per_cpu_s"] for r in runs["full"])
    print(
        f"per CPU-second (steadier on a shared host): cache {cpu_c:.1f}, full {cpu_f:.1f} samples -> "
        f"{cpu_c / cpu_f:.2f}x"
    )
    print(
        f"speed-up {c['samples_per_s'] / f['samples_per_s']:.2f}x per epoch (without the build); "
        f"bound ({L} fwd + {T} bwd) / ({T} fwd + {T} bwd) with bwd = 2 fwd: {bound:.2f}x "
        f"(with bwd = 1 fwd, as when no weight gradient is needed: {(L + T) / (2 * T):.2f}x); "
        f"peak memory ratio full/cache {f['peak_mem_gb'] / c['peak_mem_gb']:.2f}"
    )


if __name__ == "__main__":
    main()
