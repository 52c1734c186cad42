"""Whole models with moe_impl="triton" (Triton's interpreter on CPU tensors) equal the default path."""

import numpy as np
import pytest

import moe_local

pytestmark = pytest.mark.slow

IDS = np.array([[0, 0, 7, 21, 3, 90, 45], [12, 5, 64, 33, 8, 2, 101]])
MASK = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])


@pytest.mark.parametrize("folder", ["qwen3_dir", "olmoe_dir", "grove_dir"])
def test_logits_equal_default_path(folder, request):
    path = request.getfixturevalue(folder)
    default = moe_local.load(str(path), backend="torch", device="cpu")
    assert default.moe_impl == "grouped"
    fused = moe_local.load(str(path), backend="torch", device="cpu", moe_impl="triton")
    expected = default.logits(IDS, MASK)
    got = fused.logits(IDS, MASK)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_float16_grove_logits_close_to_float32(grove_dir):
    """fp16 weights through the kernels: as close to the fp32 logits as the fp16 grouped path is."""
    exact = moe_local.load(str(grove_dir), backend="torch", device="cpu").logits(IDS, MASK)
    half = moe_local.load(str(grove_dir), backend="torch", device="cpu", dtype="float16")
    half_fused = moe_local.load(str(grove_dir), backend="torch", device="cpu", dtype="float16", moe_impl="triton")
    err = np.abs(half_fused.logits(IDS, MASK) - exact).max()
    torch_err = np.abs(half.logits(IDS, MASK) - exact).max()
    assert err <= 1.5 * torch_err + 1e-3 * np.abs(exact).max(), (err, torch_err)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek", "deepseek_v3", "glm4_moe", "gpt_oss"])
def test_every_swiglu_family_runs_through_the_fused_op(family, tmp_path):
    """The fused op serves any router rule (weights come from the block's router), gpt-oss's biased,
    clamped experts in its kernels, and any family's shared experts run as a dense MLP beside it."""
    import checkpoints

    path = checkpoints.FAMILY_MAKERS[family](tmp_path / family, tokenizer=False)
    default = moe_local.load(str(path), backend="torch", device="cpu")
    fused = moe_local.load(str(path), backend="torch", device="cpu", moe_impl="triton")
    assert "Triton" in fused.execution and "grouped" in default.execution
    expected = default.logits(IDS, MASK)
    got = fused.logits(IDS, MASK)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
