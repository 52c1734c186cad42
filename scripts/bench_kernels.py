"""Microseconds per MoE layer on a CUDA GPU: the fused Triton op vs the torch path vs two launches.

    python scripts/bench_kernels.py                      # all shapes, T = 1 8 64 512 4096, bf16
    python scripts/bench_kernels.py --shapes grove --tokens 1 8
    python scripts/bench_kernels.py --tune               # best table entry per point (triton_configs)

Shapes: Qwen3-30B-A3B (E=128, k=8, H=2048, I=768), OLMoE-1B-7B (E=64, k=8, H=2048, I=1024) and
GroveMoE (the Qwen3 shape plus 64 adjugates of size 128, λ=0.05). Methods:

- ``triton``: the fused op (backends/torch/triton_moe.py), adjugates once per (token, group) in
  the same launches as the ordinary experts;
- ``torch``: the torch backend's grouped path (one matmul pair per expert present);
- ``two-launch`` (Grove): the fused op for the ordinary experts, then again for the adjugates as a
  second MoE with k slots (each adjugate once per selected expert), as GroveMoE's SGLang fork does.

Each call gets a fresh routing and fresh activations from a pool, so the experts a call touches
are mostly not in L2 from the call before (as the next layer's would not be in a model). Work is
counted as what the layer must do: bytes of the distinct experts and adjugates touched plus x and
y, FLOPs of the (token, expert) and distinct (token, group) rows. Roofs are measured in the same
run: a large device copy (bandwidth) and a large dense matmul (FLOP/s); a point's "% roof" is the
roof time ``max(bytes / bandwidth, FLOPs / FLOP/s)`` over the measured time. ``graph`` times the
fused op replayed from a CUDA graph: the gap to eager is the launch overhead.

Without a CUDA device it says so and exits 0; tests/test_triton_bench.py runs its logic on tiny
shapes in Triton's interpreter.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from moe_local.backends.torch import triton_configs
from moe_local.backends.torch.moe import Experts, expert_rows, group_rows, grouped_swiglu
from moe_local.backends.torch.router import route
from moe_local.backends.torch.triton_moe import moe_forward
from moe_local.families.grove_moe import ROUTER as GROVE_ROUTER
from moe_local.spec import GroveSpec, MoESpec, RouterSpec


@dataclass(frozen=True)
class Shape:
    name: str
    E: int
    k: int
    H: int
    I: int
    G: int = 0  # adjugate experts (Grove), one per E // G experts
    Ia: int = 0
    scale: float = 0.0

    def spec(self) -> MoESpec:
        grove = GroveSpec(self.E // self.G, self.Ia, self.scale) if self.G else None
        return MoESpec(
            layer=0,
            num_experts=self.E,
            top_k=self.k,
            expert_size=self.I,
            router=GROVE_ROUTER if grove else RouterSpec(renormalize=True),
            grove=grove,
        )


SHAPES = {
    "qwen3": Shape("Qwen3-30B-A3B", E=128, k=8, H=2048, I=768),
    "olmoe": Shape("OLMoE-1B-7B", E=64, k=8, H=2048, I=1024),
    "grove": Shape("GroveMoE", E=128, k=8, H=2048, I=768, G=64, Ia=128, scale=0.05),
}
TOKENS = (1, 8, 64, 512, 4096)
GRAPH_MAX_TOKENS = 64  # CUDA-graph timings where launch overhead matters (decode, small batches)


class Layer:
    """One layer's expert weights on a device and the methods that run it."""

    def __init__(self, shape: Shape, device, dtype, seed: int = 0):
        torch.manual_seed(seed)
        self.shape, self.spec = shape, shape.spec()
        self.experts = _experts(shape.E, shape.H, shape.I, device, dtype)
        self.adjugates = _experts(shape.G, shape.H, shape.Ia, device, dtype) if shape.G else None

    def methods(self) -> dict:
        s, ex, adj = self.shape, self.experts, self.adjugates
        out = {
            "triton": lambda x, idx, w, config=None: moe_forward(
                x,
                idx,
                w,
                ex.gate_up_proj,
                ex.down_proj,
                *((adj.gate_up_proj, adj.down_proj) if adj else ()),
                **(dict(experts_per_group=s.E // s.G, scale=s.scale) if adj else {}),
                config=config,
            ),
            "torch": self.torch_path,
        }
        if adj:
            out["two-launch"] = lambda x, idx, w: (
                moe_forward(x, idx, w, ex.gate_up_proj, ex.down_proj)
                + moe_forward(x, idx // (s.E // s.G), w * s.scale, adj.gate_up_proj, adj.down_proj)
            )
        return out

    def torch_path(self, x, idx, w):
        y = grouped_swiglu(x, *expert_rows(idx, w, self.shape.E), self.experts)
        if self.adjugates is not None:
            y = y + self.shape.scale * grouped_swiglu(x, *group_rows(idx, w, self.spec), self.adjugates)
        return y


def _experts(n, hidden, size, device, dtype) -> Experts:
    with torch.device(device):
        e = Experts(n, hidden, size).to(dtype).requires_grad_(False)
    e.gate_up_proj.normal_(0, 0.02)
    e.down_proj.normal_(0, 0.02)
    return e


def routings(shape: Shape, tokens: int, count: int, device, dtype, seed: int = 1) -> list:
    """``count`` (x, idx, weights) triples routed by the shape's router rule from random logits."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    spec = shape.spec()
    out = []
    for _ in range(count):
        x = torch.randn(tokens, shape.H, generator=g).to(device, dtype)
        idx, w = route(torch.randn(tokens, shape.E, generator=g).to(device, dtype), spec.router, spec.top_k)
        out.append((x, idx, w))
    return out


def work(shape: Shape, idx: torch.Tensor, element_bytes: int) -> tuple[int, int]:
    """(bytes, FLOPs) the layer must move and do for one routing: each distinct expert's and
    adjugate's weights read once, x read and y written once; 2 FLOPs per multiply-add of the
    (token, expert) rows and the distinct (token, group) rows."""
    tokens = idx.shape[0]
    per_expert = 3 * shape.H * shape.I
    weights = idx.unique().numel() * per_expert
    flops = 2 * idx.numel() * per_expert
    if shape.G:
        per_adjugate = 3 * shape.H * shape.Ia
        groups = idx // (shape.E // shape.G)
        token_groups = torch.unique(torch.arange(tokens, device=idx.device)[:, None] * shape.G + groups).numel()
        weights += groups.unique().numel() * per_adjugate
        flops += 2 * token_groups * per_adjugate
    return (weights + 2 * tokens * shape.H) * element_bytes, flops


class Timer:
    """Seconds per call of ``fn`` over a pool of inputs: CUDA events on a GPU, the wall clock elsewhere."""

    def __init__(self, device, reps: int, trials: int = 3, warmup: int = 2):
        self.cuda = torch.device(device).type == "cuda"
        self.reps, self.trials, self.warmup = reps, trials, warmup

    def per_call(self, fn, inputs) -> float:
        for i in range(self.warmup):
            fn(*inputs[i % len(inputs)])  # compile and warm up
        results = []
        for _ in range(self.trials):
            calls = [inputs[i % len(inputs)] for i in range(self.reps)]
            results.append(self._elapsed(lambda: [fn(*args) for args in calls]) / self.reps)
        return statistics.median(results)

    def graph_per_call(self, fn, inputs) -> float | None:
        """Per call when the calls are replayed from one CUDA graph (no launch overhead); None if
        not on a GPU or the op cannot be captured."""
        if not self.cuda:
            return None
        calls = [inputs[i % len(inputs)] for i in range(self.reps)]
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for args in calls[:2]:
                    fn(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for args in calls:
                    fn(*args)
        except Exception:  # capture is best effort: the column then reads n/a
            return None
        graph.replay()
        return statistics.median(self._elapsed(graph.replay) for _ in range(self.trials)) / self.reps

    def _elapsed(self, run) -> float:
        if not self.cuda:
            start = time.perf_counter()
            run()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / 1e3


def roofs(device, dtype, timer: Timer, copy_bytes: int = 1 << 30, matmul_n: int = 8192) -> tuple[float, float]:
    """(bytes/s of a large copy, counting read and write; FLOP/s of a large dense matmul)."""
    src = torch.empty(copy_bytes // 2, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    copy = timer.per_call(lambda: dst.copy_(src), [()])
    a = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    b = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    matmul = timer.per_call(lambda: a @ b, [()])
    return 2 * src.numel() * src.element_size() / copy, 2 * matmul_n**3 / matmul


def bench(
    shapes,
    tokens,
    device,
    dtype,
    timer: Timer,
    pool: int,
    bandwidth: float,
    flops_per_s: float,
    graphs: bool = True,
    tune: bool = False,
) -> list[dict]:
    """One row per (shape, tokens, method): µs per call, work, % of the roof."""
    rows = []
    element = torch.empty((), dtype=dtype).element_size()
    for shape in shapes:
        layer = Layer(shape, device, dtype)
        methods = layer.methods()
        for t in tokens:
            inputs = routings(shape, t, pool, device, dtype)
            counted = [work(shape, idx, element) for _, idx, _ in inputs]
            nbytes = statistics.mean(c[0] for c in counted)
            nflops = statistics.mean(c[1] for c in counted)
            roof = max(nbytes / bandwidth, nflops / flops_per_s)
            with torch.no_grad():
                for name, fn in methods.items():
                    seconds = timer.per_call(fn, inputs)
                    row = dict(
                        shape=shape.name,
                        dims=(shape.E, shape.k, shape.H, shape.I),
                        grove=bool(shape.G),
                        tokens=t,
                        method=name,
                        us=seconds * 1e6,
                        bytes=nbytes,
                        flops=nflops,
                        roof_us=roof * 1e6,
                        roof_pct=100 * roof / seconds,
                    )
                    if name == "triton" and graphs and t <= GRAPH_MAX_TOKENS:
                        g = timer.graph_per_call(fn, inputs)
                        row["graph_us"] = None if g is None else g * 1e6
                    rows.append(row)
                if tune:
                    rows.append(_tune_row(shape, t, methods["triton"], inputs, timer))
    return rows


def _tune_row(shape, tokens, fused, inputs, timer) -> dict:
    """The fastest of triton_configs.CONFIGS for this point."""
    times = {
        name: timer.per_call(lambda x, idx, w, c=cfg: fused(x, idx, w, config=c), inputs)
        for name, cfg in triton_configs.CONFIGS.items()
    }
    best = min(times, key=times.get)
    return dict(
        shape=shape.name,
        tokens=tokens,
        method=f"tune:{best}",
        us=times[best] * 1e6,
        table_key=(shape.E, shape.I, shape.H),
        times_us={n: s * 1e6 for n, s in times.items()},
    )


def table(rows: list[dict]) -> str:
    """Rows side by side, with the ratio to the torch path of the same point."""
    torch_us = {(r["shape"], r["tokens"]): r["us"] for r in rows if r["method"] == "torch"}
    lines = [
        f"{'shape':<15} {'T':>5} {'method':<12} {'µs':>10} {'graph µs':>9} {'vs torch':>9} "
        f"{'MB':>8} {'GFLOP':>8} {'roof µs':>8} {'% roof':>7}"
    ]
    for r in rows:
        if "roof_us" not in r:
            continue
        graph = "n/a" if r.get("graph_us") is None else f"{r['graph_us']:.1f}"
        ref = torch_us.get((r["shape"], r["tokens"]))
        ratio = "" if ref is None else f"{ref / r['us']:.2f}x"
        lines.append(
            f"{r['shape']:<15} {r['tokens']:>5} {r['method']:<12} {r['us']:>10.1f} {graph:>9} "
            f"{ratio:>9} {r['bytes'] / 1e6:>8.1f} {r['flops'] / 1e9:>8.2f} {r['roof_us']:>8.1f} "
            f"{r['roof_pct']:>6.1f}%"
        )
    return "\n".join(lines)


def grove_aims(rows: list[dict]) -> list[str]:
    """The issue's aim per T: Grove layer ≤ plain layer × (1 + its extra roof-time fraction) + 3 %,
    the plain layer being the measured shape with the same experts and no adjugates."""
    fused = {(r["dims"], r["grove"], r["tokens"]): r for r in rows if r["method"] == "triton"}
    out = []
    for (dims, grove, t), g in fused.items():
        plain = fused.get((dims, False, t))
        if not grove or plain is None:
            continue
        extra = g["roof_us"] / plain["roof_us"] - 1
        limit = plain["us"] * (1 + extra + 0.03)
        verdict = "met" if g["us"] <= limit else "missed"
        out.append(
            f"{g['shape']} T={t}: {g['us']:.1f} µs vs {plain['shape']} {plain['us']:.1f} µs × "
            f"(1 + {extra:.3f} + 0.03) = {limit:.1f} µs: {verdict}"
        )
    return out


def overheads(rows: list[dict]) -> list[str]:
    """Launch overhead of the fused op per point: eager time minus CUDA-graph replay time."""
    return [
        f"{r['shape']} T={r['tokens']}: launch overhead {r['us'] - r['graph_us']:.1f} µs per layer "
        f"(eager {r['us']:.1f}, graph {r['graph_us']:.1f})"
        for r in rows
        if r["method"] == "triton" and r.get("graph_us") is not None
    ]


def tune_lines(rows: list[dict]) -> list[str]:
    best: dict = {}
    for r in rows:
        if r["method"].startswith("tune:"):
            best.setdefault(r["table_key"], {})[r["tokens"]] = r["method"][5:]
    lines = []
    for key, by_tokens in best.items():
        entries = ", ".join(f"{t}: {name!r}" for t, name in sorted(by_tokens.items()))
        lines.append(f"    {key}: {{{entries}}},")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--reps", type=int, default=20, help="calls per timing")
    parser.add_argument("--pool", type=int, default=16, help="distinct routings cycled through")
    parser.add_argument("--tune", action="store_true", help="also time triton_configs' named configs per point")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_kernels: no CUDA device here, nothing to time. The kernels' correctness is tested in "
            "Triton's interpreter (tests/test_triton_*.py)."
        )
        return 0
    device, dtype = "cuda", torch.bfloat16
    timer = Timer(device, args.reps)
    bandwidth, flops_per_s = roofs(device, dtype, timer)
    print(
        f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} TB/s, "
        f"bf16 matmul {flops_per_s / 1e12:.0f} TFLOP/s"
    )
    rows = bench(
        [SHAPES[s] for s in args.shapes],
        args.tokens,
        device,
        dtype,
        timer,
        args.pool,
        bandwidth,
        flops_per_s,
        tune=args.tune,
    )
    print(table(rows))
    for line in grove_aims(rows) + overheads(rows):
        print(line)
    if args.tune:
        print("best configurations (paste into triton_configs.TABLE):")
        print("\n".join(tune_lines(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
