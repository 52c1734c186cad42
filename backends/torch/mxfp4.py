"""MXFP4 weights (the OCP Microscaling format gpt-oss's experts are released in) turned into floats.

A weight row is stored in blocks of 32 values: 16 bytes of 4-bit E2M1 codes, two a byte with the
element of even index in the low nibble, and one uint8 E8M0 scale ``s``, the power of two ``2^(s - 127)``
every value of the block is multiplied by. E2M1 is a sign bit, two exponent bits (bias 1) and one
mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives. Every such value times a power of two
is exact in float32 and bfloat16 (down to their subnormals), so dequantizing loses nothing.
"""

from __future__ import annotations

import torch

BLOCK = 32  # values per scale
BYTES = BLOCK // 2  # bytes per block


def e2m1_values() -> torch.Tensor:
    """float32 [16]: the value of each 4-bit code, from the format's fields."""
    codes = torch.arange(16)
    sign = 1.0 - 2.0 * (codes >> 3).float()
    exponent = (codes >> 1) & 3
    mantissa = (codes & 1).float()
    subnormal = mantissa * 0.5  # exponent field 0: 0 or 0.5
    normal = (1.0 + mantissa / 2) * torch.pow(2.0, (exponent - 1).float())
    return sign * torch.where(exponent == 0, subnormal, normal)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``blocks [..., G, 16]`` uint8 and ``scales [..., G]`` uint8 -> ``[..., G · 32]`` in ``dtype``.

    Decoded one slice of the leading axis at a time (one expert), so the index and float32
    intermediates stay small beside the result.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BYTES or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not fit scales {tuple(scales.shape)}")
    values = e2m1_values()
    out = torch.empty(*blocks.shape[:-1], BLOCK, dtype=dtype)
    for i in range(blocks.shape[0]):
        codes = blocks[i]
        pairs = torch.stack([values[(codes & 0x0F).long()], values[(codes >> 4).long()]], dim=-1)
        exponent = scales[i].to(torch.int32).unsqueeze(-1) - 127
        out[i] = torch.ldexp(pairs.flatten(-2), exponent).to(dtype)
    return out.flatten(-2)
