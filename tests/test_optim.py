"""The numpy optimiser against torch.optim's own."""

import numpy as np
import torch

from moe_local.optim import AdamW


def test_adamw_matches_torch():
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((4, 6)).astype(np.float32)
    ours = AdamW({"w": w0}, lr=1e-2, weight_decay=0.01)
    p = torch.nn.Parameter(torch.tensor(w0))
    ref = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.01, foreach=False)
    for _ in range(5):
        g = rng.standard_normal((4, 6)).astype(np.float32)
        ours.step({"w": g})
        p.grad = torch.tensor(g)
        ref.step()
    np.testing.assert_allclose(ours.params["w"], p.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours.exp_avg_sq["w"], ref.state[p]["exp_avg_sq"].numpy(), rtol=1e-6)
