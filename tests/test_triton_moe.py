"""The fused Triton MoE op in Triton's interpreter (CPU tensors), against the torch paths and the formula.

The op picks the interpreter for CPU tensors by itself, so these tests leave ``TRITON_INTERPRET``
alone and nothing else in the pytest process is affected; one test runs a subprocess with
``TRITON_INTERPRET=1`` set before Triton is imported, the other way users run the interpreter.
"""

import os
import subprocess
import sys

import pytest
import torch

from moe_local.backends.torch import triton_moe
from moe_local.backends.torch.moe import MoEBlock, expert_rows, group_rows, grouped_swiglu
from moe_local.backends.torch.router import route
from moe_local.families.grove_moe import ROUTER as GROVE_ROUTER
from moe_local.spec import ClampedSwiGLU, GroveSpec, MoESpec, RouterSpec

pytestmark = pytest.mark.slow


# gpt-oss's experts, the limit low enough that the random products are clamped both ways
GPT_OSS = dict(activation=ClampedSwiGLU(alpha=1.702, limit=1.5), expert_bias=True)


def block(E=8, k=2, H=64, I=32, grove=None, dtype=torch.float32, seed=0, gpt_oss=False):
    """A MoE block with random weights; ``grove`` = (experts per group, adjugate size, λ); ``gpt_oss``:
    biased experts with the clamped SwiGLU, gpt-oss's router."""
    router = GROVE_ROUTER if grove else RouterSpec(renormalize=True)
    spec = MoESpec(
        layer=0,
        num_experts=E,
        top_k=k,
        expert_size=I,
        router=RouterSpec(order="topk-score", bias=True) if gpt_oss else router,
        grove=GroveSpec(*grove) if grove else None,
        **(GPT_OSS if gpt_oss else {}),
    )
    b = MoEBlock(spec, H, "grouped")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in b.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return b.to(dtype).requires_grad_(False)


def formula(x, idx, w, b):
    """The reference formula, per slot, in float64: Σ_s w E_s(x) + λ Σ_s w A_{s // p}(x); gpt-oss's experts
    ``Wd · ((clamp(u, ±l) + 1) · g · sigmoid(α g)) + bd``, ``g = min(Wg x + bg, l)``, ``u = Wu x + bu``."""

    def swiglu(gate_up, down, v):
        gate, up = (gate_up.double() @ v).chunk(2)
        return down.double() @ (torch.nn.functional.silu(gate) * up)

    def clamped(e, v):
        ex, act = b.experts, b.spec.activation
        gate, up = (ex.gate_up_proj[e].double() @ v + ex.gate_up_proj_bias[e].double()).chunk(2)
        gate, up = gate.clamp(max=act.limit), up.clamp(-act.limit, act.limit)
        return (
            ex.down_proj[e].double() @ ((up + 1) * gate * torch.sigmoid(act.alpha * gate))
            + ex.down_proj_bias[e].double()
        )

    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        v = x[t].double()
        for s in range(idx.shape[1]):
            e, ws = int(idx[t, s]), float(w[t, s])
            if b.spec.activation:
                y[t] += ws * clamped(e, v)
                continue
            y[t] += ws * swiglu(b.experts.gate_up_proj[e], b.experts.down_proj[e], v)
            if b.spec.grove:
                a = e // b.spec.grove.experts_per_group
                adjugate = swiglu(b.chunk_experts.gate_up_proj[a], b.chunk_experts.down_proj[a], v)
                y[t] += b.spec.grove.scale * ws * adjugate
    return y


def run_op(x, idx, w, b, **kwargs):
    grove = b.spec.grove
    extra = {}
    if grove:
        extra = dict(
            adj_gate_up=b.chunk_experts.gate_up_proj,
            adj_down=b.chunk_experts.down_proj,
            experts_per_group=grove.experts_per_group,
            scale=grove.scale,
        )
    if b.spec.expert_bias:
        extra = dict(biases=(b.experts.gate_up_proj_bias, b.experts.down_proj_bias), activation=b.spec.activation)
    return triton_moe.moe_forward(x, idx, w, b.experts.gate_up_proj, b.experts.down_proj, **extra, **kwargs)


def torch_paths(b, x, idx, w):
    """moe.py's grouped path (adjugates once per group) and per-slot reference, for a given routing."""
    grouped = grouped_swiglu(x, *expert_rows(idx, w, b.spec.num_experts), b.experts)
    if b.spec.grove:
        adjugates = grouped_swiglu(x, *group_rows(idx, w, b.spec), b.chunk_experts)
        grouped = grouped + b.spec.grove.scale * adjugates
    return grouped, b._per_slot(x, idx, w)


def check(b, x, idx=None, w=None, **kwargs):
    """The op against the grouped path, the per-slot path and the formula in float64."""
    if idx is None:
        idx, w = route(b.gate(x), b.spec.router, b.spec.top_k)
    out = run_op(x, idx, w, b, **kwargs)
    exact = formula(x, idx, w, b)
    paths = torch_paths(b, x, idx, w)
    scale = exact.abs().max().item()
    if x.dtype == torch.float32:
        for other in paths:
            torch.testing.assert_close(out, other, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5 * scale)
    else:
        # low precision: at least as close to the exact value as the torch paths (fp32 accumulation,
        # one rounding of the activation; a quarter ulp of slack), and close to them
        err = (out.double() - exact).abs().max().item()
        torch_err = max((o.double() - exact).abs().max().item() for o in paths)
        ulp = torch.finfo(x.dtype).eps * scale
        assert err <= torch_err + ulp / 4, (err, torch_err, ulp)
        torch.testing.assert_close(out, paths[0], rtol=0, atol=torch_err + err + ulp)
    return out


PLAIN = dict()
GROVE = dict(grove=(2, 16, 0.05))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", [PLAIN, GROVE], ids=["plain", "grove"])
def test_matches_torch_paths(kind, dtype):
    b = block(**kind, dtype=dtype)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    check(b, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_experts_biases_and_clamped_swiglu(dtype):
    """gpt-oss's biased experts and clamped SwiGLU in the kernels' epilogues (clamps active both ways),
    several M-blocks per expert; refused beside Grove's adjugates."""
    b = block(E=4, gpt_oss=True, dtype=dtype)
    x = (2 * torch.randn(20, 64, generator=torch.Generator().manual_seed(9))).to(dtype)
    gate_up = torch.nn.functional.linear(x.float(), b.experts.gate_up_proj[0].float())
    assert (gate_up > 1.5).any() and (gate_up < -1.5).any()
    check(b, x)
    grove = block(**GROVE)
    with pytest.raises(ValueError, match="without adjugates"):
        run_op(x.float(), *route(grove.gate(x.float()), grove.spec.router, 2), grove, activation=GPT_OSS["activation"])


@pytest.mark.parametrize("kind", [PLAIN, GROVE], ids=["plain", "grove"])
def test_one_token_most_experts_empty(kind):
    b = block(**kind)
    check(b, torch.randn(1, 64, generator=torch.Generator().manual_seed(2)))


def test_top1_and_odd_sizes():
    """k = 1; E, H, I and the adjugate size multiples of no block (E=6 in 3 groups, H=48, I=24, Ia=8)."""
    b = block(E=6, k=1, H=48, I=24, grove=(2, 8, 0.05))
    check(b, torch.randn(5, 48, generator=torch.Generator().manual_seed(3)))


def test_duplicate_groups_and_groups_of_four():
    """Several of a token's experts in one group: the adjugate runs once with the summed weight."""
    b = block(E=8, k=3, grove=(4, 16, 0.25))
    idx = torch.tensor([[0, 1, 2], [4, 5, 6], [3, 7, 0], [1, 6, 2]])  # tokens 0, 1: one group only
    w = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    check(b, x, idx, w)


@pytest.mark.parametrize("kind", [PLAIN, GROVE], ids=["plain", "grove"])
def test_many_rows_per_expert(kind):
    """Several M-blocks per expert, and more rows than one pass of the align program takes."""
    b = block(E=4, k=2, **kind)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(5))
    for align in ("triton", "torch"):
        check(b, x, align=align)


def test_bfloat16_in_the_interpreter():
    """bf16 in the interpreter: the kernels upcast the dot operands and round results to nearest
    even themselves, so the interpreter computes what a GPU does."""
    b = block(**GROVE, dtype=torch.bfloat16)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    check(b, x)


@pytest.mark.parametrize("tokens,k,E,G", [(3, 2, 4, 2), (1, 1, 8, 0), (37, 3, 6, 3), (20, 8, 16, 8)])
def test_align_paths_agree(tokens, k, E, G):
    """The one-program align kernel and the torch-ops align give the same layout, bit for bit."""
    g = torch.Generator().manual_seed(tokens)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g)
    per_group = E // G if G else 1
    layout = triton_moe.Layout(tokens, k, E, G, 16)
    kernels, _ = triton_moe.kernels_for(torch.device("cpu"))
    a = triton_moe.align_rows_triton(idx, w, layout, per_group, 0.05, kernels)
    b = triton_moe.align_rows_torch(idx, w, layout, per_group, 0.05)
    for name, u, v in zip(("sorted_ids", "block_expert", "row_weight", "adj_valid"), a, b):
        if name == "adj_valid" and not G:
            continue
        torch.testing.assert_close(u, v, rtol=0, atol=1e-7 if u.is_floating_point() else 0, msg=name)


def test_worked_example_of_the_docstring():
    """The layout in triton_moe's docstring is what the align produces."""
    idx = torch.tensor([[1, 0], [3, 1], [0, 1]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]])
    layout = triton_moe.Layout(3, 2, 4, 2, 4)
    assert (layout.blocks_o, layout.blocks_a) == (4, 3)
    kernels, _ = triton_moe.kernels_for(torch.device("cpu"))
    for align in (triton_moe.align_rows_torch, triton_moe.align_rows_triton):
        sorted_ids, block_expert, row_weight, adj_valid = align(idx, w, layout, 2, 0.05, kernels)
        assert sorted_ids.tolist() == [
            1,
            4,
            12,
            12,
            0,
            3,
            5,
            12,
            2,
            12,
            12,
            12,
            12,
            12,
            12,
            12,
            6,
            9,
            10,
            12,
            8,
            12,
            12,
            12,
            12,
            12,
            12,
            12,
        ]
        assert block_expert.tolist() == [0, 1, 3, -1, 4, 5, -1]
        assert adj_valid.tolist() == [1, 0, 1, 1, 1, 0]
        expected = [0.6, 0.4, 0.7, 0.3, 0.9, 0.1, 0.05 * 1.0, None, 0.05 * 0.7, 0.05 * 0.3, 0.05 * 1.0, None]
        for got, want in zip(row_weight.tolist(), expected):
            if want is not None:
                assert got == pytest.approx(want, rel=1e-6)


def test_block_uses_kernels_without_grad_and_torch_with_grad(monkeypatch):
    """MoEBlock(impl="triton"): kernels under no_grad; with a gradient needed, the grouped path, whose
    router gradient is the one the tuner gets."""
    b = block(**GROVE)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(7))
    b.impl = "triton"
    calls = []
    fused_moe = triton_moe.fused_moe
    monkeypatch.setattr(triton_moe, "fused_moe", lambda *a: calls.append(1) or fused_moe(*a))
    with torch.no_grad():
        fused = b(x)
    assert calls == [1]
    b.gate.weight.requires_grad_(True)
    out = b(x)
    assert calls == [1] and out.grad_fn is not None
    torch.testing.assert_close(out.detach(), fused, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    grad = b.gate.weight.grad.clone()
    b.gate.weight.grad = None
    b.impl = "grouped"
    b(x).square().sum().backward()
    torch.testing.assert_close(grad, b.gate.weight.grad)


def test_interpreted_launches_leave_triton_language_as_they_found_it():
    """The interpreter patches triton.language while it runs; left patched, Triton could compile no
    kernel afterwards in the same process (a GPU model next to a CPU one, torch.compile)."""
    import triton.language as tl

    b = block(**GROVE)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(8))
    run_op(x, *route(b.gate(x), b.spec.router, b.spec.top_k), b)  # first use imports submodules lazily
    namespaces = (tl, tl.core, tl.math, tl.standard, tl.tensor, tl.core.tensor_descriptor_base)
    before = [dict(vars(n)) for n in namespaces]
    run_op(x, *route(b.gate(x), b.spec.router, b.spec.top_k), b)
    for n, was in zip(namespaces, before):
        changed = sorted(name for name, value in vars(n).items() if was.get(name, None) is not value)
        assert changed == [] and set(vars(n)) == set(was), (n, changed)


def test_empty_batch():
    b = block()
    x = torch.zeros(0, 64)
    assert run_op(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), b).shape == (0, 64)


def test_with_triton_interpret_set_before_import():
    """TRITON_INTERPRET=1 at import (Triton's own way): the kernels are interpreted functions then."""
    code = (
        "import torch\n"
        "from moe_local.backends.torch import triton_moe, triton_kernels\n"
        "from triton.runtime.interpreter import InterpretedFunction\n"
        "assert isinstance(triton_kernels.swiglu_kernel, InterpretedFunction)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "gu, d = torch.randn(4, 32, 32, generator=g), torch.randn(4, 32, 16, generator=g)\n"
        "x, w = torch.randn(3, 32, generator=g), torch.rand(3, 2, generator=g)\n"
        "idx = torch.tensor([[0, 3], [1, 3], [2, 0]])\n"
        "y = triton_moe.moe_forward(x, idx, w, gu, d)\n"
        "ref = torch.zeros_like(x)\n"
        "for t in range(3):\n"
        "    for s in range(2):\n"
        "        gate, up = (gu[idx[t, s]] @ x[t]).chunk(2)\n"
        "        ref[t] += w[t, s] * d[idx[t, s]] @ (torch.nn.functional.silu(gate) * up)\n"
        "torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
