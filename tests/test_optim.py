"""The one numpy optimiser (tune's AdamW, the oracle's Adam) against torch.optim's own."""

import numpy as np
import pytest
import torch

from moe_local.tuning.optim import AdamW, adam


@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_matches_torch(kind):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((4, 6)).astype(np.float32)
    p = torch.nn.Parameter(torch.tensor(w0))
    if kind == "adamw":
        ours = AdamW({"w": w0}, lr=1e-2, weight_decay=0.01)
        ref = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.01, foreach=False)
    else:
        ours = adam({"w": w0}, lr=0.1)
        ref = torch.optim.Adam([p], lr=0.1, foreach=False)
    for _ in range(5):
        g = rng.standard_normal((4, 6)).astype(np.float32)
        ours.step({"w": g})
        p.grad = torch.tensor(g)
        ref.step()
    np.testing.assert_allclose(ours.params["w"], p.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours.exp_avg["w"], ref.state[p]["exp_avg"].numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ours.exp_avg_sq["w"], ref.state[p]["exp_avg_sq"].numpy(), rtol=1e-6)


def test_state_round_trip_continues_the_same_steps():
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal((3, 2)).astype(np.float32) for _ in range(4)]
    whole = AdamW({"w": np.ones((3, 2))}, lr=1e-2)
    for g in grads:
        whole.step({"w": g})
    first = AdamW({"w": np.ones((3, 2))}, lr=1e-2)
    for g in grads[:2]:
        first.step({"w": g})
    second = AdamW({"w": np.zeros((3, 2))}, lr=1e-2)
    second.load(*first.state())
    for g in grads[2:]:
        second.step({"w": g})
    np.testing.assert_array_equal(second.params["w"], whole.params["w"])
    assert second.step_count == 4
