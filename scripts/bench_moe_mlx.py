"""One MoE layer on MLX: the project's block vs mlx-lm's SwitchGLU block vs the per-slot loop; Grove's overhead.

    python scripts/bench_moe_mlx.py                       # T = 1,16 on a CPU (~3 minutes on 2 cores)
    python scripts/bench_moe_mlx.py --tokens 1,16,128,512 --repeats 5
    python scripts/bench_moe_mlx.py --shapes olmoe --no-grove

fp32 at the OLMoE shape (E=64, k=8, H=2048, I=1024) and the Qwen3-30B-A3B shape (E=128, k=8, H=2048,
I=768); Grove at GroveMoE's shape (Qwen3-30B-A3B experts + 64 adjugates of 128, λ = 0.05) against the
same-shape plain MoE, each adjugate strategy (docs/methods.md): per-slot (in the experts' sorted rows),
per-group (once per (token, group), host-counted rows), merged (each expert concatenated with its
group's adjugate, λ folded into the down projection: one gather for both); "(auto)" marks the one the
block's default picks at that size. Grove rows are timed twice: random routing, and co-activated
routing (paired experts share their gate row, so a token picks both experts of 4 groups: the case
Grove's per-group execution is for). Every implementation runs on the same weights and inputs; its
output is checked against the per-slot loop (max relative error printed; where the loop is not timed,
against mlx-lm's block or Grove's per-slot strategy). Times are medians of interleaved repeats after
a warm-up.

Roof: a dense fp32 MLX matmul measured in the same run; "% roof" = FLOPs executed / time / that rate.
On Linux this times MLX's CPU build only: it says nothing about Apple silicon (Metal). The script
runs unchanged on a Mac, where MLX's default device is the GPU.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

SHAPES = {  # name: (experts, top-k, hidden, expert size)
    "olmoe": (64, 8, 2048, 1024),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
}
GROVE = (128, 8, 2048, 768, 128)  # GroveMoE: Qwen3-30B-A3B experts + 64 adjugates of 128
LONG_RUN_S = 5.0


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tokens",
        default=None,
        help="comma-separated token counts (default 1,16,128,512 on a GPU, 1,16 on a CPU, "
        "where MLX runs at ~1 GFLOP/s and T=512 takes about a minute per call)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (median)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"subset of {','.join(SHAPES)}")
    parser.add_argument("--no-grove", action="store_true", help="skip the Grove rows")
    parser.add_argument(
        "--variants", action="store_true", help="also time our block with rows always / never sorted by expert"
    )
    parser.add_argument(
        "--loop-max-tokens", type=int, default=1, help="time the per-slot loop only up to this many tokens (it is slow)"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def timed(fns: dict, repeats: int, mx) -> tuple[dict, dict]:
    """(median seconds, output) per function: one warm-up each, then ``repeats`` interleaved rounds.

    A warm-up that takes longer than LONG_RUN_S counts as the first sample (one-time costs are
    nothing next to it), so that large token counts on a CPU stay affordable.
    """
    outputs, times = {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        outputs[name] = fn()
        mx.eval(outputs[name])
        seconds = time.perf_counter() - start
        times[name] = [seconds] if seconds > LONG_RUN_S else []
    for round_ in range(repeats - min(len(t) for t in times.values())):
        # Alternate the order so that no implementation always runs right after the same neighbour.
        for name, fn in list(fns.items()) if round_ % 2 == 0 else list(fns.items())[::-1]:
            if len(times[name]) >= repeats:
                continue
            start = time.perf_counter()
            mx.eval(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def matmul_roof(mx) -> float:
    """fp32 FLOP/s of a dense [512, 2048] x [2048, 2048] MLX matmul (the layer's GEMM shape class)."""
    a, b = mx.random.normal((512, 2048)), mx.random.normal((2048, 2048))
    mx.eval(a, b)
    seconds, _ = timed({"mm": lambda: a @ b}, 5, mx)
    return 2 * 512 * 2048 * 2048 / seconds["mm"]


def random_params(block, mx, seed: int, gate_std: float = 0.02):
    from mlx.utils import tree_flatten

    mx.random.seed(seed)
    # Uniform with the intended standard deviation: MLX's CPU normal sampler takes ~1 min for the
    # 600 M weights of the Qwen3 shape, uniform a quarter of that.
    params = [
        (name, mx.random.uniform(-1, 1, p.shape) * 3**0.5 * (gate_std if name.startswith("gate") else 0.02))
        for name, p in tree_flatten(block.parameters())
    ]
    block.load_weights(params)
    mx.eval(block.parameters())


def rel_err(out, ref, mx) -> float:
    return (mx.abs(out - ref).max() / mx.abs(ref).max()).item()


class Table:
    HEADER = (
        "| shape | T | routing | implementation | median ms | vs baseline | GFLOP/s | % roof | "
        "FLOP ratio | max rel err |"
    )

    def __init__(self, roof: float):
        self.roof = roof
        print(self.HEADER)
        print("|---" * (self.HEADER.count("|") - 1) + "|")

    def row(self, shape, tokens, routing, name, seconds, baseline, flops, flop_ratio, err):
        rate = flops / seconds
        ratio = "baseline" if seconds is baseline else f"{seconds / baseline:.2f}x"
        print(
            f"| {shape} | {tokens} | {routing} | {name} | {seconds * 1e3:.1f} | {ratio} | {rate / 1e9:.2f} | "
            f"{100 * rate / self.roof:.0f}% | {flop_ratio} | {err:.1e} |",
            flush=True,
        )


def expert_flops(tokens: int, k: int, hidden: int, size: int) -> int:
    return tokens * k * 6 * hidden * size


def sorted_rows(block, min_rows):
    def run(x):
        default, block.sort_min_rows = block.sort_min_rows, min_rows
        try:
            return block(x)
        finally:
            block.sort_min_rows = default

    return run


def plain_section(table, shapes, tokens_list, repeats, seed, mx, variants=False, loop_max_tokens=16):
    from mlx.utils import tree_flatten
    from mlx_lm.models.qwen3_moe import ModelArgs, Qwen3MoeSparseMoeBlock

    from moe_local.backends.mlx.moe import MoEBlock
    from moe_local.spec import MoESpec, RouterSpec

    for shape in shapes:
        e, k, h, size = SHAPES[shape]
        spec = MoESpec(layer=0, num_experts=e, top_k=k, expert_size=size, router=RouterSpec(renormalize=True))
        ours = MoEBlock(spec, h)
        random_params(ours, mx, seed)
        loop = MoEBlock(spec, h, impl="reference")
        theirs = Qwen3MoeSparseMoeBlock(
            ModelArgs(
                model_type="qwen3_moe",
                hidden_size=h,
                num_hidden_layers=1,
                intermediate_size=size,
                num_attention_heads=16,
                num_experts=e,
                num_experts_per_tok=k,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                moe_intermediate_size=size,
                rms_norm_eps=1e-6,
                vocab_size=8,
                num_key_value_heads=4,
                head_dim=128,
                rope_theta=1e6,
                tie_word_embeddings=False,
                max_position_embeddings=4096,
                norm_topk_prob=True,
            )
        )
        shared = tree_flatten(ours.parameters())  # the same arrays, no copies
        theirs.load_weights(shared)
        loop.load_weights(shared)
        for tokens in tokens_list:
            x = mx.random.normal((1, tokens, h))
            mx.eval(x)
            fns = {"ours (grouped)": lambda: ours(x), "mlx-lm SwitchGLU block": lambda: theirs(x)}
            if variants:
                fns["ours, rows always sorted"] = lambda: sorted_rows(ours, 0)(x)
                fns["ours, rows never sorted"] = lambda: sorted_rows(ours, float("inf"))(x)
            if tokens <= loop_max_tokens:
                fns["per-slot loop (reference)"] = lambda: loop(x)
            seconds, outs = timed(fns, repeats, mx)
            flops = expert_flops(tokens, k, h, size) + 2 * tokens * e * h
            base = seconds["ours (grouped)"]
            reference = outs.get("per-slot loop (reference)", outs["mlx-lm SwitchGLU block"])
            for name in fns:
                table.row(
                    shape, tokens, "random", name, seconds[name], base, flops, "", rel_err(outs[name], reference, mx)
                )
        del ours, loop, theirs, shared


def grove_section(table, tokens_list, repeats, seed, mx, loop_max_tokens=16):
    import numpy as np

    from moe_local.backends.mlx.moe import MoEBlock, choose_adjugate
    from moe_local.backends.mlx.router import route
    from moe_local.families.grove_moe import ROUTER as GROVE_ROUTER
    from moe_local.spec import GroveSpec, MoESpec

    e, k, h, size, adjugate = GROVE
    grove_spec = GroveSpec(experts_per_group=2, adjugate_size=adjugate, scale=0.05)
    spec = MoESpec(layer=0, num_experts=e, top_k=k, expert_size=size, router=GROVE_ROUTER, grove=grove_spec)
    grove = MoEBlock(spec, h)
    random_params(grove, mx, seed)
    # Plain MoE of the same shape and routing rule, sharing the experts and the gate.
    plain = MoEBlock(MoESpec(layer=0, num_experts=e, top_k=k, expert_size=size, router=GROVE_ROUTER), h)
    plain.gate, plain.switch_mlp = grove.gate, grove.switch_mlp
    # Merged: each expert concatenated with its group's adjugate, λ folded into the down projection;
    # routed exactly like Grove (sigmoid select, renormalised softmax weights), one gather for both.
    merged = MoEBlock(MoESpec(layer=0, num_experts=e, top_k=k, expert_size=size + adjugate, router=GROVE_ROUTER), h)
    merged.gate = grove.gate
    rep = lambda a: mx.repeat(a, grove_spec.experts_per_group, axis=0)  # noqa: E731
    ex, adj = grove.switch_mlp, grove.chunk_experts
    merged.switch_mlp.gate_proj.weight = mx.concatenate([ex.gate_proj.weight, rep(adj.gate_proj.weight)], axis=1)
    merged.switch_mlp.up_proj.weight = mx.concatenate([ex.up_proj.weight, rep(adj.up_proj.weight)], axis=1)
    merged.switch_mlp.down_proj.weight = mx.concatenate(
        [ex.down_proj.weight, grove_spec.scale * rep(adj.down_proj.weight)], axis=2
    )
    mx.eval(merged.parameters())
    co_gate = mx.repeat(grove.gate.weight[: e // 2], 2, axis=0)  # experts 2g and 2g+1 score equally
    random_gate = grove.gate.weight
    mx.eval(co_gate)
    loop = MoEBlock(spec, h, impl="reference")  # the per-slot loop on the same modules
    loop.gate, loop.switch_mlp, loop.chunk_experts = grove.gate, grove.switch_mlp, grove.chunk_experts

    def with_strategy(strategy):
        def run(x):
            grove.adjugate = strategy
            return grove(x)

        return run

    for routing, gate in (("random", random_gate), ("co-activated", co_gate)):
        grove.gate.weight = gate
        for tokens in tokens_list:
            x = mx.random.normal((1, tokens, h))
            mx.eval(x)
            idx, _ = route(grove.gate(x[0]), spec.router, spec.top_k)
            groups_per_token = np.mean([len(set((row // 2).tolist())) for row in np.array(idx)])
            auto = choose_adjugate("auto", tokens * k)
            mark = lambda strategy: " (auto)" if strategy == auto else ""  # noqa: E731
            fns = {
                "plain MoE, same shape": lambda: plain(x),
                "grove per-slot" + mark("per-slot"): lambda: with_strategy("per-slot")(x),
                "grove per-group" + mark("per-group"): lambda: with_strategy("per-group")(x),
                "grove merged weights": lambda: merged(x),
            }
            if tokens <= loop_max_tokens:
                fns["grove per-slot loop (reference)"] = lambda: loop(x)
            seconds, outs = timed(fns, repeats, mx)
            # The reference is the per-slot loop where it ran, else the per-slot strategy (checked
            # against the loop and the formula in tests/test_mlx_moe.py).
            reference = outs.get("grove per-slot loop (reference)", outs["grove per-slot" + mark("per-slot")])
            plain_flops = expert_flops(tokens, k, h, size) + 2 * tokens * e * h
            adj_rows = {"per-slot": tokens * k, "per-group": tokens * groups_per_token}
            base = seconds["plain MoE, same shape"]
            for name in fns:
                strategy = "per-group" if "per-group" in name else "per-slot"
                flops = plain_flops if name.startswith("plain") else plain_flops + adj_rows[strategy] * 6 * h * adjugate
                err = 0.0 if name.startswith("plain") else rel_err(outs[name], reference, mx)
                table.row("grove", tokens, routing, name, seconds[name], base, flops, f"{flops / plain_flops:.3f}", err)
    grove.gate.weight = random_gate
    grove.adjugate = "auto"


def main(argv=None):
    args = parse(argv)
    import mlx.core as mx

    device = mx.default_device()
    tokens = args.tokens or ("1,16,128,512" if device == mx.gpu else "1,16")
    tokens_list = [int(t) for t in tokens.split(",") if t]
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        sys.exit(f"unknown shape {unknown[0]} (choose from {', '.join(SHAPES)})")
    print(f"# MLX {mx.__version__}, device {device}, fp32, {platform.system()} {platform.machine()}")
    if platform.system() != "Darwin":
        print("# On Linux this times MLX's CPU build only: these numbers say nothing about Apple silicon (Metal).")
    roof = matmul_roof(mx)
    print(f"# roof: dense fp32 matmul [512,2048]x[2048,2048] = {roof / 1e9:.1f} GFLOP/s, measured in this run")
    print(
        f"# medians of {args.repeats} interleaved runs after a warm-up; 'vs baseline' = time / the first row "
        "of its group (ours, or the plain MoE for Grove); FLOP ratio = Grove FLOPs / plain FLOPs"
    )
    print()
    table = Table(roof)
    plain_section(table, shapes, tokens_list, args.repeats, args.seed, mx, args.variants, args.loop_max_tokens)
    if not args.no_grove:
        grove_section(table, tokens_list, args.repeats, args.seed, mx, args.loop_max_tokens)


if __name__ == "__main__":
    main()
