"""MLXModel.save: float models come back as Hugging Face folders that the torch backend and mlx-lm read."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx_lm")

import moe_local  # noqa: E402
from moe_local.checkpoint import tensor_index  # noqa: E402

from helpers import gate_name, rel  # noqa: E402

IDS = np.random.default_rng(2).integers(0, 128, (2, 20))


def with_new_gate(folder):
    m = moe_local.load(str(folder), backend="mlx")
    layer = m.spec.moe_layers[-1]
    shape = m.get_router_weights([layer])[gate_name(layer)].shape
    m.set_router_weights({gate_name(layer): np.random.default_rng(3).standard_normal(shape).astype(np.float32)})
    return m


def test_saved_float_model_is_a_hugging_face_folder(qwen3_dir, tmp_path):
    m = with_new_gate(qwen3_dir)
    out = m.save(tmp_path / "saved")
    names = tensor_index(out)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert not any("switch_mlp" in n for n in names)
    assert set(names) == set(tensor_index(qwen3_dir))
    expected = m.logits(IDS)
    assert rel(moe_local.load(str(out), backend="torch").logits(IDS), expected) <= 1e-4
    assert rel(moe_local.load(str(out), backend="mlx").logits(IDS), expected) <= 1e-6


def test_saved_grove_model_keeps_grovemoe_format(grove_dir, tmp_path):
    m = with_new_gate(grove_dir)
    out = m.save(tmp_path / "saved")
    assert set(tensor_index(out)) == set(tensor_index(grove_dir))  # chunk_experts.J.*, expert_bias
    assert rel(moe_local.load(str(out), backend="torch").logits(IDS), m.logits(IDS)) <= 1e-4
