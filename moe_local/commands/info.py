"""``moe-local info``: what a model is, what it costs, and where it would run."""

from __future__ import annotations

import click

from moe_local.backends import auto_backend
from moe_local.checkpoint import is_quantized, resolve_model, tensor_index, weight_bytes
from moe_local.errors import UserError
from moe_local.families import load_spec
from moe_local.sizing import estimate_memory

from .options import ConfigCommand, model_option


def _gb(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 / 100 else f"{n / 1024**2:.1f} MiB"


def _params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _ranges(ids) -> str:
    ids = list(ids)
    if not ids:
        return "none"
    out, start = [], ids[0]
    for prev, cur in zip(ids, ids[1:] + [None]):
        if cur != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(out)


def execution_here(spec) -> str:
    """How the MoE layers would run with --backend auto here (the backend's own account)."""
    from moe_local.backends import backend_module

    try:
        return backend_module(auto_backend()).describe_execution(spec)
    except UserError as e:  # the backend is not installed
        return str(e)


def describe(spec, folder) -> list[str]:
    m = spec.moe[0]
    counts = spec.parameter_counts()
    quantized = is_quantized(tensor_index(folder))
    method = (spec.config.get("quantization_config") or {}).get("quant_method")
    mxfp4 = method == "mxfp4"  # gpt-oss's release: torch dequantizes the experts, MLX runs them as stored
    # A quantized folder's weights are what it stores; a float one runs at its dtype.
    stored = quantized or (mxfp4 and auto_backend() == "mlx")
    mem = estimate_memory(spec, weights=weight_bytes(folder) if stored else None)
    router = m.router.describe()
    active = _params(counts["active_min"])
    if counts["active_max"] != counts["active_min"]:
        active = f"{_params(counts['active_min'])}-{_params(counts['active_max'])}"
    lines = [
        f"model:        {folder}",
        f"family:       {spec.family}",
        f"layers:       {spec.num_layers} ({len(spec.moe)} MoE: {_ranges(spec.moe_layers)}; "
        f"{len(spec.dense_layers)} dense: {_ranges(spec.dense_layers)})",
        f"hidden:       {spec.hidden_size}, {spec.num_heads} heads ({spec.num_kv_heads} KV) of {spec.head_dim}, "
        f"vocab {spec.vocab_size}",
        f"experts:      {m.num_experts} of size {m.expert_size}, top-{m.top_k}; {m.describe_experts()}",
        f"router:       {router}",
    ]
    if m.shared:
        lines.append(
            f"shared:       {m.shared.count} expert(s) of size {m.shared.size}"
            + (", gated by sigmoid(shared_expert_gate(x))" if m.shared.gated else ", ungated")
        )
    if m.grove:
        lines.append(
            f"adjugates:    {m.num_groups} groups of {m.grove.experts_per_group} experts, one adjugate "
            f"of size {m.grove.adjugate_size} each, scale {m.grove.scale:g}"
        )
    lines += [
        f"parameters:   {_params(counts['total'])} total, {active} active per token (embeddings included)",
        f"dtype:        {spec.dtype}"
        + (", weights quantized (MLX)" if quantized else "")
        + (", experts MXFP4 (dequantized at load on torch, run as mxfp4 on MLX)" if mxfp4 else ""),
        f"backend:      {auto_backend()} (what --backend auto picks here)",
        f"execution:    {execution_here(spec)}",
        f"memory chat:  {_gb(mem.chat)} (weights {_gb(mem.weights)} + KV cache {_gb(mem.kv_cache)} "
        f"for {mem.chat_context} tokens)",
        f"memory tune:  {_gb(mem.tune)} (weights + activations of the tuned suffix for batch {mem.tune_batch} "
        f"x {mem.tune_seq} tokens, last {mem.tune_layers} MoE layers, fp32 routers with AdamW state)",
    ]
    return lines


@click.command(cls=ConfigCommand)
@model_option
def info(model):
    """Describe a model: family, layers, experts, router, groups, parameters, backend, memory."""
    folder = resolve_model(model)
    for line in describe(load_spec(folder), folder):
        click.echo(line)
