"""A small, CPU-fast PyTorch transcription of transformers' Qwen3-MoE forward, used only to train the
embedded models (scripts/train_tiny.py); the shipped checkpoints are written and checked by
transformers itself.

It holds the checkpoint's tensors under their on-disk names (per-expert Linear layers) and computes the
same function: RMSNorm, q/k-norm, default RoPE, GQA, causal attention, softmax router -> top-k
(renormalised only with ``norm_topk_prob``), SwiGLU experts; optionally GroveMoE's adjugate experts
(sigmoid selection, always-renormalised weights, ``y += λ Σ_groups (Σ w) A_group(x)``).

Training extras (not part of the checkpoint): ``route_bias={layer: [B, T, E]}`` is added to the router
logits for selection and weights (forced routing), and the router logits are returned per layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(head_dim, theta, positions):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    fr = positions.float()[..., None] * inv
    emb = torch.cat([fr, fr], -1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        H, hd = c.hidden_size, c.head_dim
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, hd
        self.q_proj = nn.Linear(H, self.nh * hd, bias=False)
        self.k_proj = nn.Linear(H, self.nkv * hd, bias=False)
        self.v_proj = nn.Linear(H, self.nkv * hd, bias=False)
        self.o_proj = nn.Linear(self.nh * hd, H, bias=False)
        self.q_norm = RMSNorm(hd, c.rms_norm_eps)
        self.k_norm = RMSNorm(hd, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.nh, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.nkv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.nh // self.nkv
        if rep > 1:
            k = k.repeat_interleave(rep, 1)
            v = v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.hd**-0.5)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class Expert(nn.Module):
    def __init__(self, H, I):
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    def __init__(self, H, E):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(E, H))


class MoE(nn.Module):
    """Qwen3-MoE block; with ``grove`` = (experts per group, adjugate size, λ) GroveMoE's block."""

    def __init__(self, c, grove=None):
        super().__init__()
        self.E, self.k, self.norm = c.num_experts, c.num_experts_per_tok, c.norm_topk_prob
        self.gate = Gate(c.hidden_size, self.E)
        self.experts = nn.ModuleList([Expert(c.hidden_size, c.moe_intermediate_size) for _ in range(self.E)])
        self.grove = grove
        if grove:
            per, size, _ = grove
            self.chunk_experts = nn.ModuleList([Expert(c.hidden_size, size) for _ in range(self.E // per)])

    @staticmethod
    def _run(experts, h, idx, w, n):
        """Σ_slots w · experts[idx](h): rows sorted by expert, one call per expert present."""
        out = torch.zeros_like(h)
        k = idx.shape[1]
        flat_e, flat_w = idx.reshape(-1), w.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=n).tolist()
        start = 0
        for e, cnt in enumerate(counts):
            if cnt:
                sl = order[start : start + cnt]
                tok = sl // k
                out = out.index_add(0, tok, experts[e](h[tok]) * flat_w[sl, None])
                start += cnt
        return out

    def forward(self, x, bias=None):
        B, T, H = x.shape
        h = x.reshape(-1, H)
        logits = F.linear(h, self.gate.weight)
        sel = logits if bias is None else logits + bias.reshape(-1, self.E)
        probs = torch.softmax(sel.float(), -1)
        if self.grove:
            _, top_i = torch.topk(torch.sigmoid(sel.float()), self.k, -1)
            top_v = probs.gather(-1, top_i)
            top_v = top_v / top_v.sum(-1, keepdim=True)
        else:
            top_v, top_i = torch.topk(probs, self.k, -1)
            if self.norm:
                top_v = top_v / top_v.sum(-1, keepdim=True)
        top_v = top_v.to(h.dtype)
        out = self._run(self.experts, h, top_i, top_v, self.E)
        if self.grove:
            per, _, scale = self.grove
            # per-slot adjugates (the reference formula; equal to once per group with summed weights)
            out = out + scale * self._run(self.chunk_experts, h, top_i // per, top_v, self.E // per)
        return out.view(B, T, H), logits.view(B, T, self.E)


class Layer(nn.Module):
    def __init__(self, c, grove=None):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MoE(c, grove)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, bias=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        m, lg = self.mlp(self.post_attention_layernorm(x), bias)
        return x + m, lg


class TinyMoE(nn.Module):
    def __init__(self, c, grove=None):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([Layer(c, grove) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.theta = c.rope_parameters["rope_theta"]
        for _, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=c.initializer_range)

    def head(self, h):
        return F.linear(self.norm(h), self.embed_tokens.weight)

    def forward(self, ids, attention_mask, route_bias=None):
        """(last hidden states [B, T, H], router logits per layer). Left or right padding."""
        B, T = ids.shape
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = causal[None] & attention_mask.bool()[:, None, :]
        mask = (mask | torch.eye(T, dtype=torch.bool)[None])[:, None]  # padded rows attend to themselves
        cos, sin = rope_cos_sin(self.c.head_dim, self.theta, pos)
        cos, sin = cos[:, None], sin[:, None]
        x = self.embed_tokens(ids)
        router = []
        for li, layer in enumerate(self.layers):
            x, lg = layer(x, cos, sin, mask, None if route_bias is None else route_bias.get(li))
            router.append(lg)
        return x, router

    def state_dict_hf(self):
        return {"model." + k: v.detach().clone().contiguous() for k, v in self.state_dict().items()}

    def load_hf(self, sd, strict=True):
        own = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.") and "expert_bias" not in k}
        missing, unexpected = self.load_state_dict(own, strict=False)
        assert not unexpected, unexpected
        if strict:
            assert not missing, missing
        return missing
