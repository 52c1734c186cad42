"""One MoE layer on the CPU: the project's block vs transformers' experts vs the roof, and Grove's overhead.

    python scripts/bench_moe.py                 # torch section (fp32, CPU), all shapes
    python scripts/bench_moe.py --backend mlx   # MLX section (scripts/bench_moe_mlx.py)
    python scripts/bench_moe.py --tokens 1,16 --repeats 3
    python scripts/bench_moe.py --family mixtral-8x7b,glm-4.5-air,deepseek-v3 --shapes '' --no-grove

Roof: the least time the layer can take on this machine = max(FLOPs / dense-matmul FLOP/s,
bytes of the distinct experts the batch touches / read bandwidth), both rates measured in this
run (the matmul in the layer's dtype). Peers run side by side in one process on the same weights
and inputs; medians of repeats.

--family: one MoE layer at a release's real sizes, ours vs the family's own transformers block.
The stacked experts are allocated empty (Linux maps a page when it is first written) and only the
experts the benchmark's inputs route to are filled, so a DeepSeek-V3 layer (22.5 GB in bf16) costs
the few GB its tokens touch; ours must equal transformers' output before anything is timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

SHAPES = {  # name: (experts, top-k, hidden, expert size)
    "olmoe": (64, 8, 2048, 1024),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
}
DEFAULT_TOKENS = (1, 16, 128, 512)
GROVE = (128, 8, 2048, 768, 128)  # GroveMoE: Qwen3-30B-A3B experts + 64 adjugates of 128


class Family(NamedTuple):
    """One MoE layer of a release: its config.json (the release's sizes, one layer, that layer MoE),
    the token counts run per dtype, transformers' block ("module:Class", config class) and what the
    comparison is."""

    config: dict
    runs: dict
    theirs: tuple | None
    note: str


FAMILIES = {
    "mixtral-8x7b": Family(
        dict(
            model_type="mixtral",
            hidden_size=4096,
            intermediate_size=14336,
            num_local_experts=8,
            num_experts_per_tok=2,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            num_hidden_layers=1,
        ),
        {"float32": (1, 16, 128), "bfloat16": (1, 16, 128)},
        ("transformers.models.mixtral.modeling_mixtral:MixtralSparseMoeBlock", "MixtralConfig"),
        "transformers' MixtralSparseMoeBlock (softmax, top-2 renormalised).",
    ),
    "glm-4.5-air": Family(
        dict(
            model_type="glm4_moe",
            hidden_size=4096,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            n_routed_experts=128,
            num_experts_per_tok=8,
            n_group=1,
            topk_group=1,
            n_shared_experts=1,
            routed_scaling_factor=1.0,
            norm_topk_prob=True,
            first_k_dense_replace=0,
            num_attention_heads=96,
            num_key_value_heads=8,
            head_dim=128,
            partial_rotary_factor=0.5,
            attention_bias=True,
            use_qk_norm=False,
            vocab_size=151552,
            num_hidden_layers=1,
        ),
        {"float32": (1, 16, 128), "bfloat16": (1, 16, 128)},
        ("transformers.models.glm4_moe.modeling_glm4_moe:Glm4MoeMoE", "Glm4MoeConfig"),
        "transformers' Glm4MoeMoE (sigmoid router with e_score_correction_bias, n_group 1, 1 shared expert).",
    ),
    "deepseek-v3": Family(
        dict(
            model_type="deepseek_v3",
            hidden_size=7168,
            intermediate_size=18432,
            moe_intermediate_size=2048,
            n_routed_experts=256,
            num_experts_per_tok=8,
            n_group=8,
            topk_group=4,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            first_k_dense_replace=0,
            num_attention_heads=128,
            num_key_value_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            v_head_dim=128,
            vocab_size=129280,
            num_hidden_layers=1,
        ),
        {"bfloat16": (1, 4, 8, 16)},
        ("transformers.models.deepseek_v3.modeling_deepseek_v3:DeepseekV3MoE", "DeepseekV3Config"),
        "transformers' DeepseekV3MoE (sigmoid router with e_score_correction_bias, 8 groups keep 4, scaling "
        "2.5, 1 shared expert); bf16 only (the stacked experts are 45 GB in fp32); the release's FP8 "
        "block-quantised weights are not run.",
    ),
    "deepseekmoe-16b": Family(
        dict(
            model_type="deepseek",
            hidden_size=2048,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            n_routed_experts=64,
            num_experts_per_tok=6,
            n_shared_experts=2,
            norm_topk_prob=False,
            scoring_func="softmax",
            first_k_dense_replace=0,
            moe_layer_freq=1,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=102400,
            num_hidden_layers=1,
        ),
        {"float32": (1, 16, 128)},
        None,
        "transformers has no DeepSeekMoE class (its code is remote code): 'hf' here is transformers' "
        "Qwen3MoeSparseMoeBlock with norm_topk_prob=False (DeepSeekMoE's rule: softmax, top-6, not "
        "renormalised) plus transformers' LlamaMLP of 2 x 1408 as the ungated shared experts, summed.",
    ),
    "gpt-oss-20b": Family(
        dict(
            model_type="gpt_oss",
            hidden_size=2880,
            intermediate_size=2880,
            num_local_experts=32,
            num_experts_per_tok=4,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=201088,
            num_hidden_layers=2,  # a sliding and a full layer, as gpt-oss alternates them; layer 0 is run
        ),
        {"float32": (1, 16, 128), "bfloat16": (1, 16, 128)},
        ("transformers.models.gpt_oss.modeling_gpt_oss:GptOssMLP", "GptOssConfig"),
        "transformers' GptOssMLP (router with a bias: top-4 of the logits, softmax over them; experts with "
        "biases and the clamped SwiGLU, stored [E, H, 2I] interleaved: its own copy of our experts, converted); "
        "the release's MXFP4 experts dequantized, as both load them on a CPU.",
    ),
}


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
    (counted both ways: reads and writes share the memory bus) and a 2048^3 matmul in the layer's dtype
    (fp32 unless asked; bytes are bytes, so the read probes stay fp32)."""

    def __init__(self, torch):
        self.torch = torch
        self.src = torch.randn(256 * 1024 * 1024)
        self.dst = torch.empty_like(self.src)
        self.operands = {torch.float32: (torch.randn(2048, 2048), torch.randn(2048, 2048))}
        self.nbytes = self.src.numel() * self.src.element_size()

    def probes(self, dtype=None) -> dict:
        dtype = dtype or self.torch.float32
        if dtype not in self.operands:
            self.operands[dtype] = tuple(self.torch.randn(2048, 2048, dtype=dtype) for _ in range(2))
        a, b = self.operands[dtype]
        return {
            "roof:sum": lambda: self.src.sum(),
            "roof:copy": lambda: self.dst.copy_(self.src),
            "roof:matmul": lambda: a @ b,
        }

    def rates(self, t: dict) -> tuple[float, float]:
        """(read bytes/s, FLOP/s) from the probes' medians."""
        return max(self.nbytes / t["roof:sum"], 2 * self.nbytes / t["roof:copy"]), 2 * 2048**3 / t["roof:matmul"]


def layer_work(idx, num_experts, hidden, size, top_k, groups=None, adjugate=0, shared=0, itemsize=4):
    """(FLOPs, bytes) the layer must do and read for this routing: the gate, the distinct experts touched,
    Grove's adjugates, ``shared`` = the shared experts' total intermediate size; weights of ``itemsize`` bytes."""
    tokens = idx.shape[0]
    flops = 2 * tokens * num_experts * hidden + tokens * (top_k * size + shared) * 6 * hidden
    touched = len(set(idx.flatten().tolist()))
    nbytes = itemsize * (num_experts * hidden + (touched * size + shared) * 3 * hidden)
    if groups:
        pairs = {(t, int(e) // 2) for t in range(tokens) for e in idx[t].tolist()}
        flops += len(pairs) * 6 * hidden * adjugate
        nbytes += itemsize * len({g for _, g in pairs}) * 3 * hidden * adjugate
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
    if shapes:
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


def family_section(names, repeats, tokens=None, max_expert_gb=6.0):
    """One MoE layer per family at the release's sizes: ours vs transformers' block vs the roof."""
    import torch

    torch.manual_seed(0)
    roofs = Roofs(torch)
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads on the CPU; one MoE layer at each "
        f"release's sizes; medians of {repeats} rounds, peers and roof probes (matmul in the layer's dtype) "
        f"interleaved; ours checked equal to transformers' outputs before timing; load average "
        f"{os.getloadavg()[0]:.1f} at the start"
    )
    print()
    print(
        "| family | dtype | T | experts touched | ours ms | ours, per-expert loop ms | hf eager ms | hf grouped_mm ms "
        "| roof ms | read GB/s | GFLOP/s | roof/ours | ours vs best hf |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        family = FAMILIES[name]
        for dtype_name, planned in family.runs.items():
            layer = FamilyLayer(torch, family, getattr(torch, dtype_name))
            for count in tokens or planned:
                print(layer.row(name, count, roofs, repeats, max_expert_gb * 1e9), flush=True)
            del layer
    print()
    for name in names:
        print(f"- {name}: {FAMILIES[name].note}")
    print(f"- not run: a token count whose inputs touch more than {max_expert_gb:g} GB of experts (--max-expert-gb)")
    print(f"- peak resident memory of this process: {peak_rss_gb():.1f} GB (VmHWM)")


class FamilyLayer:
    """Our block of a family and transformers' own, sharing every tensor; the stacked experts are
    allocated empty and an expert is filled (random) only once an input routes to it."""

    def __init__(self, torch, family: Family, dtype):
        from moe_local.backends.torch.moe import MoEBlock
        from moe_local.families import spec_from_config

        self.torch, self.dtype = torch, dtype
        spec = spec_from_config(family.config)
        self.spec, self.moe, self.hidden = spec, spec.moe[0], spec.hidden_size
        with torch.device("meta"):
            block = MoEBlock(self.moe, self.hidden, "grouped", spec.names).to(dtype)
        block.to_empty(device="cpu")  # untouched pages cost no memory until written
        if block.gate.e_score_correction_bias is not None:
            block.gate.e_score_correction_bias = torch.empty(self.moe.num_experts)  # float32, as checkpoints keep it
        self.ours = block.eval()
        self.theirs, self.config, self.module = transformers_block(torch, family, block, spec.names.fused)
        self.filled = set()
        with torch.no_grad():
            block.gate.weight.normal_(0, self.hidden**-0.5)  # router logits of unit scale
            if block.gate.e_score_correction_bias is not None:
                block.gate.e_score_correction_bias.normal_(0, 0.1)
            for bias in (block.gate.bias, block.experts.gate_up_proj_bias, block.experts.down_proj_bias):
                if bias is not None:  # gpt-oss
                    bias.normal_(0, 0.02)
            if self.moe.shared:
                for p in getattr(block, block.shared_names[0]).parameters():
                    p.normal_(0, 0.02)

    def row(self, name, tokens, roofs, repeats, max_expert_bytes) -> str:
        """One table row: route T random tokens, fill the experts they reach, check, time."""
        from moe_local.backends.torch.router import route

        torch, block, moe = self.torch, self.ours, self.moe
        x = torch.randn(1, tokens, self.hidden, dtype=self.dtype)
        with torch.inference_mode():
            idx, _ = route(block.gate(x[0]), moe.router, moe.top_k, block.gate.e_score_correction_bias)
        touched = set(idx.flatten().tolist())
        itemsize = block.experts.gate_up_proj.element_size()
        needed = len(self.filled | touched) * 3 * self.hidden * moe.expert_size * itemsize
        dtype = str(self.dtype).removeprefix("torch.")
        head = f"| {name} | {dtype} | {tokens} | {len(touched)}/{moe.num_experts} |"
        if needed > max_expert_bytes:
            return f"{head} not run: {needed / 1e9:.1f} GB of experts, over --max-expert-gb |"
        self.fill(touched - self.filled)
        self.assert_same(x)
        with torch.inference_mode():
            t = interleaved_medians(
                {
                    "ours": lambda: block(x),
                    "loop": lambda: per_expert_loop(block, x),
                    **{impl: lambda impl=impl: hf_call(self.theirs, self.config, impl, x) for impl in HF_IMPLS},
                    **roofs.probes(self.dtype),
                },
                repeats,
            )
        bandwidth, flops_rate = roofs.rates(t)
        shared = moe.shared.count * moe.shared.size if moe.shared else 0
        flops, nbytes = layer_work(
            idx, moe.num_experts, self.hidden, moe.expert_size, moe.top_k, shared=shared, itemsize=itemsize
        )
        roof = max(flops / flops_rate, nbytes / bandwidth)
        best_hf = min(t[impl] for impl in HF_IMPLS)
        return (
            f"{head} {t['ours'] * 1e3:.2f} | {t['loop'] * 1e3:.2f} | {t['eager'] * 1e3:.2f} | "
            f"{t['grouped_mm'] * 1e3:.2f} | {roof * 1e3:.2f} | {bandwidth / 1e9:.1f} | {flops_rate / 1e9:.0f} | "
            f"{roof / t['ours']:.2f} | {best_hf / t['ours']:.2f}x |"
        )

    def fill(self, experts):
        with self.torch.no_grad():
            for e in sorted(experts):
                self.ours.experts.gate_up_proj[e].normal_(0, 0.02)
                self.ours.experts.down_proj[e].normal_(0, 0.02)
        if self.spec.names.fused:  # transformers' block holds its own copy in the checkpoint's layout
            copy_fused_experts(self.torch, self.ours, self.module, self.spec.names.fused, sorted(experts))
        self.filled |= experts

    def assert_same(self, x):
        """A benchmark that times a wrong answer is worthless: ours (both paths) must equal each transformers path."""
        rtol = 1e-4 if self.dtype == self.torch.float32 else 2e-2
        with self.torch.inference_mode():
            ours = {"ours": self.ours(x).float(), "ours per-expert loop": per_expert_loop(self.ours, x).float()}
            for impl in HF_IMPLS:
                theirs = hf_call(self.theirs, self.config, impl, x).float()
                atol = rtol * theirs.abs().max().item()
                for path, out in ours.items():
                    self.torch.testing.assert_close(
                        out, theirs, rtol=rtol, atol=atol, msg=lambda m, p=path, i=impl: f"{p} vs hf {i}: {m}"
                    )


HF_IMPLS = ("eager", "grouped_mm")


def transformers_block(torch, family: Family, ours, fused=None):
    """(transformers' block of the family as a callable, the config its experts read the implementation
    from, the routed block's module), built on the meta device and then given our tensors: no weight is
    held twice, except experts stored in another layout (``fused``: gpt-oss), which get their own memory,
    filled by ``FamilyLayer.fill``."""
    import importlib

    import transformers

    values = {k: v for k, v in family.config.items() if k != "model_type"}
    with torch.device("meta"):
        if family.theirs is None:  # DeepSeekMoE: transformers' Qwen3-MoE block + LlamaMLP shared experts
            config = transformers.Qwen3MoeConfig(
                hidden_size=values["hidden_size"],
                num_experts=values["n_routed_experts"],
                num_experts_per_tok=values["num_experts_per_tok"],
                moe_intermediate_size=values["moe_intermediate_size"],
                norm_topk_prob=values["norm_topk_prob"],
            )
            from transformers.models.llama.modeling_llama import LlamaMLP
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

            routed = Qwen3MoeSparseMoeBlock(config)
            shared_size = values["moe_intermediate_size"] * values["n_shared_experts"]
            shared = LlamaMLP(
                transformers.LlamaConfig(hidden_size=values["hidden_size"], intermediate_size=shared_size)
            )
            modules = (routed, shared)
        else:
            path, config_class = family.theirs
            module, cls = path.split(":")
            config = getattr(transformers, config_class)(**values)
            routed = getattr(importlib.import_module(module), cls)(config)
            shared = getattr(routed, "shared_experts", None)
            modules = (routed,)
    if fused is not None:
        routed = share_fused(torch, ours, routed)
    else:
        share_tensors(ours, routed, shared)
    for m in modules:
        m.eval()
        left = [n for n, p in [*m.named_parameters(), *m.named_buffers()] if p.is_meta]
        assert not left, f"transformers' block kept tensors of its own: {left}"
    if family.theirs is None:
        return (lambda x: routed(x) + shared(x)), config, routed
    if fused is not None:  # GptOssMLP returns (hidden, router scores)
        return (lambda x: routed(x)[0]), config, routed
    return routed, config, routed


def share_fused(torch, ours, routed):
    """gpt-oss's block (``router``, ``experts`` in its [E, H, 2I] interleaved layout): the router's and the
    down bias shared, the experts and the gate-up bias (interleaved) allocated for copies."""
    routed.router.weight, routed.router.bias = ours.gate.weight, ours.gate.bias
    experts = routed.experts
    experts.down_proj_bias = ours.experts.down_proj_bias
    for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias"):
        meta = getattr(experts, name)
        dtype = ours.experts.gate_up_proj.dtype
        setattr(experts, name, torch.nn.Parameter(torch.empty(meta.shape, dtype=dtype), requires_grad=False))
    return routed


def copy_fused_experts(torch, ours, routed, layout, experts):
    """Our experts ``experts`` into transformers' copy, in the checkpoint's layout (backends/torch/fused.py)."""
    from moe_local.backends.torch import fused

    with torch.no_grad():
        bias = ours.experts.gate_up_proj_bias
        routed.experts.gate_up_proj_bias.copy_(fused.to_checkpoint("gate_up_proj_bias", bias, layout))
        for e in experts:
            for name in ("gate_up_proj", "down_proj"):
                stored = fused.to_checkpoint(name, getattr(ours.experts, name)[e : e + 1], layout)
                getattr(routed.experts, name)[e].copy_(stored[0])


def share_tensors(ours, routed, shared=None):
    """transformers' block reads our tensors (same names: gate, experts.gate_up_proj/down_proj, shared MLP)."""
    routed.gate.weight = ours.gate.weight
    if ours.gate.e_score_correction_bias is not None:
        routed.gate.e_score_correction_bias = ours.gate.e_score_correction_bias
    routed.experts.gate_up_proj = ours.experts.gate_up_proj
    routed.experts.down_proj = ours.experts.down_proj
    if shared is not None:
        ours_shared = getattr(ours, ours.shared_names[0])
        for part in ("gate_proj", "up_proj", "down_proj"):
            getattr(shared, part).weight = getattr(ours_shared, part).weight


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM, Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


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
    parser.add_argument(
        "--tokens", help="comma-separated token counts (default 1,16,128,512; --family: each family's own)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"subset of {','.join(SHAPES)} ('' for none)")
    parser.add_argument("--no-grove", action="store_true", help="skip the Grove table")
    parser.add_argument("--family", default="", help=f"one MoE layer at a release's sizes: {','.join(FAMILIES)}")
    parser.add_argument(
        "--max-expert-gb",
        type=float,
        default=6.0,
        help="--family: skip a token count whose inputs touch more expert weights than this (default 6)",
    )
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else None
    shapes = [s for s in args.shapes.split(",") if s]
    families = [f for f in args.family.split(",") if f]
    unknown = [n for n in shapes if n not in SHAPES] + [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(
            f"unknown shape or family {', '.join(unknown)} (shapes: {', '.join(SHAPES)}; "
            f"families: {', '.join(FAMILIES)})"
        )
    if args.backend in ("torch", "all") and (shapes or not args.no_grove):
        torch_section(tokens or DEFAULT_TOKENS, args.repeats, shapes, grove=not args.no_grove)
    if args.backend in ("torch", "all") and families:
        family_section(families, args.repeats, tokens, args.max_expert_gb)
    if args.backend in ("mlx", "all"):
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_moe_mlx

        bench_moe_mlx.main(["--tokens", ",".join(map(str, tokens or DEFAULT_TOKENS)), "--repeats", str(args.repeats)])


if __name__ == "__main__":
    main()
