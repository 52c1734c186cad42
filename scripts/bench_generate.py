"""Generation speed: the project's path (moe_local's Conversation over the backend) vs the library's own.

    python scripts/bench_generate.py                       # torch section, tiny + wide models
    python scripts/bench_generate.py --threads 1 --repeats 5
    python scripts/bench_generate.py --backend mlx         # mlx-lm's stream_generate vs ours (MLX backend)

Models: the built-in ``tiny`` when installed (else a random model of the tests' tiny shape) and a
wider random Qwen3-MoE written to a temporary folder (hidden 512, 8 layers, 16 experts top-2).
Every path gets the same prompt ids, greedy decoding and the same number of new tokens (end tokens
ignored). Prompt tokens/s = prompt tokens / time to the first new token; decode tokens/s = the
tokens after the first / the time after it — mlx-lm's definitions. Medians of repeats after a warm-up.

torch peers, on the same weights: transformers' ``generate`` with its own MoE layers (default
experts implementation) and, to isolate our streaming wrapper, ``generate`` called directly on our
model (our MoE blocks, no worker thread). On a CPU shared with other jobs, use ``--threads 1``:
OpenMP threads that wait for each other on an oversubscribed machine swamp what is measured.

MLX peers, on the same weights: mlx-lm's ``stream_generate`` on mlx-lm's own model (its SwitchGLU
experts, the tokenizer and streaming detokenizer ``mlx_lm.load`` gives), and ``stream_generate`` on our
model (our MoE blocks, mlx-lm's loop, no text) to separate the blocks from our Conversation around it
(our path runs that same loop and detokenizes in moe_local/chat.py). MLX runs on the default device:
a Mac's GPU, or the CPU where MLX is a CPU build (Linux).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

WIDE = dict(
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=16,
    num_experts_per_tok=2,
    moe_intermediate_size=256,
    intermediate_size=1024,
    vocab_size=512,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)
TINY = dict(
    WIDE,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    moe_intermediate_size=32,
    intermediate_size=96,
    vocab_size=512,
)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def write_random_model(folder: Path, shape: dict, seed: int = 0) -> Path:
    """A random Qwen3-MoE saved by transformers, both config spellings, a trained byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**shape))
    with torch.no_grad():  # a wider spread than the init, so routing is not uniform
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["num_experts"] = config.get("num_local_experts", shape["num_experts"])
    config["rope_theta"] = (config.get("rope_parameters") or {}).get("rope_theta", 1e6)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    rng = random.Random(seed)
    text = [
        " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(12))
        for _ in range(400)
    ]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shape["vocab_size"],
        special_tokens=["<unk>", "<|end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|end|>", pad_token="<pad>"
    ).save_pretrained(str(folder))
    return folder


def models(root: Path) -> list[tuple[str, Path]]:
    from moe_local.checkpoint import BUILTIN_MODELS

    tiny = BUILTIN_MODELS["tiny"]
    if not (tiny / "config.json").is_file():
        tiny = write_random_model(root / "tiny", TINY)
    return [("tiny", tiny), ("wide", write_random_model(root / "wide", WIDE))]


def prompt(tokenizer, n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, len(tokenizer)) for _ in range(n)]


def median_rates(runs: dict, repeats: int) -> dict:
    """Median (prompt tok/s, decode tok/s) per path; the paths take turns in each repeat, so a load
    that drifts during the run (a shared machine) touches them alike."""
    for run in runs.values():
        run()  # warm-up
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(run())
    return {
        name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for name, rs in samples.items()
    }


def rates(n_prompt: int, n_new: int, start: float, first: float, end: float) -> tuple[float, float]:
    return n_prompt / (first - start), (n_new - 1) / (end - first)


# ---------------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------------


def torch_section(args, root: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3MoeForCausalLM
    from transformers.generation.streamers import BaseStreamer

    import moe_local
    from moe_local.chat import Conversation

    if args.threads:
        torch.set_num_threads(args.threads)

    class Clock(BaseStreamer):
        """Times of the prompt and of each new token as ``generate`` hands them out."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def library_run(model, ids):
        config = GenerationConfig(
            max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        x = torch.tensor([ids])
        clock = Clock()
        start = time.perf_counter()
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config, streamer=clock)
        end = time.perf_counter()
        return rates(len(ids), args.new, start, clock.times[1], end)

    def ours_run(m, ids):
        chat = Conversation(m, max_tokens=args.new)
        for _ in chat.complete(ids, eos_ids=()):
            pass
        assert chat.stats.generation_tokens == args.new
        return chat.stats.prompt_tps, chat.stats.generation_tps

    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 on the CPU; "
        f"prompt {args.prompt} tokens, {args.new} new tokens, greedy, median of {args.repeats}"
    )
    print()
    print("| model | path | prompt tok/s | decode tok/s | decode vs transformers |")
    print("|---|---|---|---|---|")
    for name, folder in models(root):
        m = moe_local.load(folder, backend="torch", device="cpu")
        ids = prompt(m.tokenizer, args.prompt)
        hf = Qwen3MoeForCausalLM.from_pretrained(str(folder)).eval()
        results = median_rates(
            {
                "transformers generate (its MoE)": lambda: library_run(hf, ids),
                "transformers generate, our blocks": lambda: library_run(m.model, ids),
                "moe-local (Conversation, streamed)": lambda: ours_run(m, ids),
            },
            args.repeats,
        )
        base = results["transformers generate (its MoE)"][1]
        for path, (p, d) in results.items():
            print(f"| {name} | {path} | {p:.0f} | {d:.1f} | {d / base:.2f}x |")
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# MLX
# ---------------------------------------------------------------------------------------------


def mlx_section(args, root: Path) -> None:
    import mlx.core as mx
    from mlx_lm import load as mlx_load
    from mlx_lm.generate import stream_generate

    def library_run(model, tokenizer, ids):
        tokenizer.eos_token_ids = set()
        start, times = time.perf_counter(), []
        for _ in stream_generate(model, tokenizer, mx.array(ids), max_tokens=args.new):
            times.append(time.perf_counter())
        assert len(times) == args.new
        # Timed here like the torch peers (its own prompt_tps / generation_tps start the decode clock
        # after the first token is handed out, and count that token in the decode rate).
        return rates(len(ids), args.new, start, times[0], times[-1])

    try:
        import moe_local
        from moe_local.backends import backend_module

        backend_module("mlx")
        from moe_local.chat import Conversation
    except (ImportError, moe_local.UserError):
        Conversation = None
        print("# the MLX backend is not installed in this checkout: only mlx-lm's side is measured")

    print(f"# mlx {mx.__version__} on {mx.default_device()}; prompt {args.prompt} tokens, {args.new} new tokens")
    print()
    print("| model | path | prompt tok/s | decode tok/s | decode vs mlx-lm |")
    print("|---|---|---|---|---|")
    for name, folder in models(root):
        model, tokenizer = mlx_load(str(folder))
        ids = prompt(tokenizer, args.prompt)
        runs = {"mlx-lm stream_generate (its MoE)": lambda: library_run(model, tokenizer, ids)}
        if Conversation is not None:
            m = moe_local.load(folder, backend="mlx")

            def ours_run():
                chat = Conversation(m, max_tokens=args.new)
                for _ in chat.complete(ids, eos_ids=()):
                    pass
                assert chat.stats.generation_tokens == args.new
                return chat.stats.prompt_tps, chat.stats.generation_tps

            runs["mlx-lm stream_generate, our blocks"] = lambda: library_run(m.model, tokenizer, ids)
            runs["moe-local (Conversation, streamed)"] = ours_run
        results = median_rates(runs, args.repeats)
        base = results["mlx-lm stream_generate (its MoE)"][1]
        for path, (p, d) in results.items():
            print(f"| {name} | {path} | {p:.0f} | {d:.1f} | {d / base:.2f}x |")
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["torch", "mlx"], default="torch")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (torch_section if args.backend == "torch" else mlx_section)(args, Path(tmp))


if __name__ == "__main__":
    main()
