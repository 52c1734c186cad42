"""The kernels compile for an H100 (sm_90) without one: Triton's compiler and ptxas run on the CPU.

The interpreter checks what the kernels compute, not that a GPU accepts them (block sizes, types
of both arms of an ``if``, pointer arithmetic). This compiles the exact launches the op makes on a
GPU, their argument types and specialisations taken from real arguments, down to a cubin.
(Compiled without the specialisation, the GEMMs are not software-pipelined and spill registers;
with it, every configuration in triton_configs.CONFIGS compiled without spills for sm_90.)
"""

import pytest
import torch

from moe_local.backends.torch import triton_configs, triton_kernels, triton_moe
from moe_local.spec import ClampedSwiGLU

pytestmark = pytest.mark.slow


class Recorder:
    """Stands in for the kernels module: records each launch instead of running it."""

    def __init__(self):
        self.launches = []

    def __getattr__(self, name):
        kernel = getattr(triton_kernels, name)
        recorder = self

        class Launch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.launches.append((kernel, args, kwargs))

        return Launch()


def launches(monkeypatch, dtype, config, grove=True, gpt_oss=False):
    recorder = Recorder()
    monkeypatch.setattr(triton_moe, "kernels_for", lambda device: (recorder, False))
    g = torch.Generator().manual_seed(0)
    E, G, H, I, Ia, k = 8, 4, 64, 32, 16, 2
    x = torch.randn(3, H, generator=g).to(dtype)
    idx = torch.tensor([[0, 1], [5, 2], [7, 6]])
    w = torch.rand(3, k, generator=g).to(dtype)
    adjugates = dict(
        adj_gate_up=torch.randn(G, 2 * Ia, H).to(dtype),
        adj_down=torch.randn(G, H, Ia).to(dtype),
        experts_per_group=2,
        scale=0.05,
    )
    biased = dict(
        biases=(torch.randn(E, 2 * I).to(dtype), torch.randn(E, H).to(dtype)),
        activation=ClampedSwiGLU(alpha=1.702, limit=7.0),
    )
    triton_moe.moe_forward(
        x,
        idx,
        w,
        torch.randn(E, 2 * I, H).to(dtype),
        torch.randn(E, H, I).to(dtype),
        **(adjugates if grove else {}),
        **(biased if gpt_oss else {}),
        config=config,
        align="triton",
    )
    return recorder.launches


def compile_for_h100(kernel, args, kwargs):
    """Compile one recorded launch as Triton's JIT would on an H100: the same specialisation of the
    arguments (16-byte-aligned pointers, integers divisible by 16), target sm_90."""
    import triton

    # Triton's internals (pinned by constraints.txt): skip, not fail, on a Triton that moved them.
    libtriton = pytest.importorskip("triton._C.libtriton")
    if not hasattr(libtriton, "native_specialize_impl"):
        pytest.skip(f"triton {triton.__version__} has no native_specialize_impl (written for 3.9)")
    native_specialize_impl = libtriton.native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
    signature, attrs = {}, {}
    for i, (param, arg) in enumerate(zip(kernel.params, args)):
        kind, attr = native_specialize_impl(CUDABackend, arg, False, not param.do_not_specialize, True)
        assert kind != "constexpr", f"{param.name}={arg} would become a constant"
        signature[param.name] = kind
        attrs[(i,)] = CUDABackend.parse_attr(attr or "")
    signature.update({n: "constexpr" for n in kwargs})
    source = ASTSource(fn=kernel, signature=signature, constexprs=dict(kwargs), attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.parametrize(
    "dtype,configs", [(torch.bfloat16, ("decode", "prefill")), (torch.float32, ("decode",))], ids=["bf16", "fp32"]
)
def test_every_launch_compiles_for_sm90(monkeypatch, dtype, configs):
    pytest.importorskip("triton.backends.nvidia.compiler")
    seen = set()
    for name in configs:
        for grove, gpt_oss in ((True, False), (False, False), (False, True)):  # gpt-oss: biases, clamped SwiGLU
            for kernel, args, kwargs in launches(monkeypatch, dtype, triton_configs.CONFIGS[name], grove, gpt_oss):
                key = (
                    kernel.__name__,
                    tuple(str(getattr(a, "dtype", type(a))) for a in args),
                    tuple(sorted(kwargs.items())),
                )
                if key in seen:
                    continue
                seen.add(key)
                compiled = compile_for_h100(kernel, args, dict(kwargs))
                assert compiled.asm["cubin"], kernel.__name__
    assert {k[0] for k in seen} == {"align_kernel", "swiglu_kernel", "down_kernel", "combine_kernel"}
