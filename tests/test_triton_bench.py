"""scripts/bench_kernels.py's logic on tiny shapes, its kernels in Triton's interpreter (no timing checks)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["bench_kernels"]


def test_work_counts_distinct_experts_and_groups(bench):
    shape = bench.Shape("tiny", E=4, k=2, H=8, I=4, G=2, Ia=2, scale=0.05)
    idx = torch.tensor([[0, 1], [0, 2]])  # experts {0, 1, 2}; groups {0}, {0, 1}: 3 (token, group) rows
    nbytes, flops = bench.work(shape, idx, element_bytes=2)
    assert nbytes == (3 * 3 * 8 * 4 + 2 * 3 * 8 * 2 + 2 * 2 * 8) * 2
    assert flops == 2 * 4 * 3 * 8 * 4 + 2 * 3 * 3 * 8 * 2
    plain = bench.Shape("tiny", E=4, k=2, H=8, I=4)
    assert bench.work(plain, idx, 4) == ((3 * 3 * 8 * 4 + 2 * 2 * 8) * 4, 2 * 4 * 3 * 8 * 4)


def test_bench_rows_table_and_aims_on_tiny_shapes(bench):
    plain = bench.Shape("tiny", E=8, k=2, H=32, I=16)
    grove = bench.Shape("tiny-grove", E=8, k=2, H=32, I=16, G=4, Ia=16, scale=0.05)
    timer = bench.Timer("cpu", reps=1, trials=1, warmup=0)
    bandwidth, flops_per_s = bench.roofs("cpu", torch.float32, timer, copy_bytes=1 << 20, matmul_n=64)
    assert bandwidth > 0 and flops_per_s > 0
    rows = bench.bench(
        [plain, grove], [1, 5], "cpu", torch.float32, timer, pool=2, bandwidth=bandwidth, flops_per_s=flops_per_s
    )
    methods = {(r["shape"], r["tokens"], r["method"]) for r in rows}
    assert methods == {
        (s, t, m)
        for t in (1, 5)
        for s, ms in (("tiny", ("triton", "torch")), ("tiny-grove", ("triton", "torch", "two-launch")))
        for m in ms
    }
    assert all(r["us"] > 0 and r["roof_pct"] > 0 for r in rows)
    assert all(r["graph_us"] is None for r in rows if r["method"] == "triton")  # no CUDA graphs on a CPU
    text = bench.table(rows)
    assert len(text.splitlines()) == 1 + len(rows) and "two-launch" in text
    aims = bench.grove_aims(rows)
    assert len(aims) == 2 and all(a.startswith("tiny-grove T=") for a in aims)
    assert bench.overheads(rows) == []  # no graph timings on a CPU
    first = rows[0]
    assert first["method"] == "triton"
    first["graph_us"] = first["us"] / 4
    assert bench.overheads(rows) == [
        f"tiny T=1: launch overhead {first['us'] * 0.75:.1f} µs per layer "
        f"(eager {first['us']:.1f}, graph {first['us'] / 4:.1f})"
    ]


def test_tune_picks_a_named_config(bench):
    shape = bench.Shape("tiny", E=4, k=1, H=16, I=16)
    timer = bench.Timer("cpu", reps=1, trials=1, warmup=0)
    rows = bench.bench(
        [shape], [1], "cpu", torch.float32, timer, pool=1, bandwidth=1.0, flops_per_s=1.0, graphs=False, tune=True
    )
    tuned = [r for r in rows if r["method"].startswith("tune:")]
    assert len(tuned) == 1 and set(tuned[0]["times_us"]) == {"decode", "small", "medium", "large", "prefill"}
    assert bench.tune_lines(rows) == [f"    (4, 16, 16): {{1: {tuned[0]['method'][5:]!r}}},"]
    assert "tune:" not in bench.table(rows)


def test_methods_compute_the_same_layer(bench):
    """The fused op, the torch path and the two-launch approach are the same function of the input."""
    shape = bench.Shape("tiny-grove", E=8, k=3, H=32, I=16, G=4, Ia=16, scale=0.05)
    layer = bench.Layer(shape, "cpu", torch.float32)
    x, idx, w = bench.routings(shape, 6, 1, "cpu", torch.float32)[0]
    with torch.no_grad():
        outs = {name: fn(x, idx, w) for name, fn in layer.methods().items()}
    for name in ("triton", "two-launch"):
        torch.testing.assert_close(outs[name], outs["torch"], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_without_a_gpu_it_says_so_and_exits_0(bench, capsys):
    assert bench.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
