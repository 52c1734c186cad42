"""One MoE layer on the CPU: the project's block vs transformers' experts vs the roof, and Grove's overhead.

    python scripts/bench_moe.py                 # torch section (fp32, CPU), all shapes
    python scripts/bench_moe.py --backend mlx   # MLX section (scripts/bench_moe_mlx.py)
    python scripts/bench_moe.py --tokens 1,16 --repeats 3

Roof: the least time the layer can take on this machine = max(FLOPs / dense-matmul FLOP/s,
bytes of the distinct experts the batch touches / read bandwidth), both rates measured in this
run. Peers run side by side in one process on the same weights and inputs; medians of repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

SHAPES = {  # name: (experts, top-k, hidden, expert size)
    "olmoe": (64, 8, 2048, 1024),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
}
GROVE = (128, 8, 2048, 768, 128)  # GroveMoE: Qwen3-30B-A3B experts + 64 adjugates of 128


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each function over ``repeats`` rounds in which the peers take turns (the order
    rotating), so that a shared machine's drift touches every peer alike."""
    for fn in fns.values():
        fn()  # warm-up
    names, times = list(fns), {name: [] for name in fns}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class Roofs:
    """Probes of this machine's rates, timed among the peers: a 1 GiB sum (reads only), a 1 GiB copy
    (counted both ways: reads and writes share the memory bus) and a 2048^3 fp32 matmul."""

    def __init__(self, torch):
        self.src = torch.randn(256 * 1024 * 1024)
        self.dst = torch.empty_like(self.src)
        self.a, self.b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        self.nbytes = self.src.numel() * self.src.element_size()

    def probes(self) -> dict:
        return {
            "roof:sum": lambda: self.src.sum(),
            "roof:copy": lambda: self.dst.copy_(self.src),
            "roof:matmul": lambda: self.a @ self.b,
        }

    def rates(self, t: dict) -> tuple[float, float]:
        """(read bytes/s, FLOP/s) from the probes' medians."""
        return max(self.nbytes / t["roof:sum"], 2 * self.nbytes / t["roof:copy"]), 2 * 2048**3 / t["roof:matmul"]


def layer_work(idx, num_experts, hidden, size, top_k, groups=None, adjugate=0):
    """(FLOPs, bytes) the layer must do and read for this routing (fp32 weights)."""
    tokens = idx.shape[0]
    flops = 2 * tokens * num_experts * hidden + tokens * top_k * 6 * hidden * size
    touched = len(set(idx.flatten().tolist()))
    nbytes = 4 * (num_experts * hidden + touched * 3 * hidden * size)
    if groups:
        pairs = {(t, int(e) // 2) for t in range(tokens) for e in idx[t].tolist()}
        flops += len(pairs) * 6 * hidden * adjugate
        nbytes += 4 * len({g for _, g in pairs}) * 3 * hidden * adjugate
    return flops, nbytes


def torch_section(tokens_list, repeats, shapes, grove=True):
    import torch
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from moe_local.backends.torch import moe as moe_ops
    from moe_local.backends.torch.router import route
    from moe_local.families.grove_moe import ROUTER as GROVE_ROUTER
    from moe_local.spec import GroveSpec, MoESpec, RouterSpec

    torch.manual_seed(0)
    roofs = Roofs(torch)
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 on the CPU; medians of {repeats} "
        "rounds, peers and roof probes interleaved"
    )
    print()
    print(
        "| shape | T | ours ms | ours, per-expert loop ms | hf eager ms | hf grouped_mm ms | roof ms | "
        "read GB/s | GFLOP/s | roof/ours | ours vs best hf |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def make_block(num_experts, top_k, hidden, size, grove_spec=None):
        spec = MoESpec(
            layer=0,
            num_experts=num_experts,
            top_k=top_k,
            expert_size=size,
            router=GROVE_ROUTER if grove_spec else RouterSpec(renormalize=True),
            grove=grove_spec,
        )
        block = moe_ops.MoEBlock(spec, hidden).eval()
        with torch.no_grad():
            for name, p in block.named_parameters():
                p.normal_(0, 0.05 if "gate.weight" in name else 0.02)
        return block

    for name in shapes:
        e, k, h, size = SHAPES[name]
        block = make_block(e, k, h, size)
        config = Qwen3MoeConfig(
            hidden_size=h, num_experts=e, num_experts_per_tok=k, moe_intermediate_size=size, norm_topk_prob=True
        )
        hf = Qwen3MoeSparseMoeBlock(config).eval()
        hf.gate.weight = block.gate.weight
        hf.experts.gate_up_proj = block.experts.gate_up_proj
        hf.experts.down_proj = block.experts.down_proj
        for tokens in tokens_list:
            x = torch.randn(1, tokens, h)
            with torch.inference_mode():
                idx, _ = route(block.gate(x[0]), block.spec.router, block.spec.top_k)
                t = interleaved_medians(
                    {
                        "ours": lambda: block(x),
                        "loop": lambda: per_expert_loop(block, x),
                        **{impl: lambda impl=impl: hf_call(hf, config, impl, x) for impl in ("eager", "grouped_mm")},
                        **roofs.probes(),
                    },
                    repeats,
                )
            bandwidth, flops_rate = roofs.rates(t)
            flops, nbytes = layer_work(idx, e, h, size, k)
            roof = max(flops / flops_rate, nbytes / bandwidth)
            best_hf = min(t["eager"], t["grouped_mm"])
            print(
                f"| {name} | {tokens} | {t['ours'] * 1e3:.2f} | {t['loop'] * 1e3:.2f} | {t['eager'] * 1e3:.2f} | "
                f"{t['grouped_mm'] * 1e3:.2f} | {roof * 1e3:.2f} | {bandwidth / 1e9:.1f} | {flops_rate / 1e9:.0f} | "
                f"{roof / t['ours']:.2f} | {best_hf / t['ours']:.2f}x |",
                flush=True,
            )
        del block, hf
    if not grove:
        return
    print()
    print("| GroveMoE shape | T | grove ms | plain ms | per-slot loop ms | overhead | FLOP ratio | grove vs loop |")
    print("|---|---|---|---|---|---|---|---|")
    e, k, h, size, adjugate = GROVE
    grove_block = make_block(e, k, h, size, GroveSpec(experts_per_group=2, adjugate_size=adjugate, scale=0.05))
    plain = make_block(e, k, h, size)
    with torch.no_grad():
        plain.gate.weight.copy_(grove_block.gate.weight)
        plain.experts.gate_up_proj.copy_(grove_block.experts.gate_up_proj)
        plain.experts.down_proj.copy_(grove_block.experts.down_proj)
    for tokens in tokens_list:
        x = torch.randn(1, tokens, h)
        with torch.inference_mode():
            idx, _ = route(grove_block.gate(x[0]), grove_block.spec.router, grove_block.spec.top_k)
            t = interleaved_medians(
                {
                    "grove": lambda: grove_block(x),
                    "plain": lambda: plain(x),
                    "loop": lambda: reference_block(grove_block, x),
                },
                repeats,
            )
        t_grove, t_plain, t_loop = t["grove"], t["plain"], t["loop"]
        grove_flops, _ = layer_work(idx, e, h, size, k, groups=e // 2, adjugate=adjugate)
        plain_flops, _ = layer_work(idx, e, h, size, k)
        print(
            f"| grove | {tokens} | {t_grove * 1e3:.2f} | {t_plain * 1e3:.2f} | {t_loop * 1e3:.2f} | "
            f"{(t_grove / t_plain - 1) * 100:+.1f}% | {(grove_flops / plain_flops - 1) * 100:+.1f}% | "
            f"{t_loop / t_grove:.2f}x |"
        )


def per_expert_loop(block, x):
    """The block on the path a gradient takes (a matmul pair per expert), whatever the batch."""
    block._grouped_mm_applies = lambda *_: False
    try:
        return block(x)
    finally:
        del block._grouped_mm_applies


def reference_block(block, x):
    block.impl = "reference"
    try:
        return block(x)
    finally:
        block.impl = "grouped"


def hf_call(hf, config, impl, x):
    config._experts_implementation = impl
    return hf(x)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["torch", "mlx", "all"], default="torch")
    parser.add_argument("--tokens", default="1,16,128,512", help="comma-separated token counts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"subset of {','.join(SHAPES)}")
    parser.add_argument("--no-grove", action="store_true", help="skip the Grove table")
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    shapes = [s for s in args.shapes.split(",") if s]
    if args.backend in ("torch", "all"):
        torch_section(tokens, args.repeats, shapes, grove=not args.no_grove)
    if args.backend in ("mlx", "all"):
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_moe_mlx

        bench_moe_mlx.main(["--tokens", args.tokens, "--repeats", str(args.repeats)])


if __name__ == "__main__":
    main()
