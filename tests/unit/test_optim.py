"""Optimisers: the batched Muon makes torch's Muon updates; compiled blocks keep names and outputs."""

from __future__ import annotations

import pytest
import torch

from unite_core.optim import BatchedMuon


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32)] * 3 + [(32, 96)] * 2 + [(48, 48)]  # groups of equal shapes, tall and wide
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


@pytest.mark.parametrize("nesterov,wd", [(True, 0.0), (False, 0.1)])
def test_batched_muon_makes_torchs_muon_updates(nesterov, wd):
    a, b = _params(), _params()
    kw = dict(lr=0.02, weight_decay=wd, nesterov=nesterov, eps=1e-6, adjust_lr_fn="match_rms_adamw")
    ref, ours = torch.optim.Muon(a, **kw), BatchedMuon(b, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in a]
        for p, q, gr in zip(a, b, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        ref.step()
        ours.step()
    for p, q in zip(a, b):
        # Newton-Schulz runs in bf16 in both: equal up to bf16 rounding of the update
        assert torch.allclose(p, q, atol=2e-3, rtol=0), (p - q).abs().max()
    for pa, pb in zip(a, b):
        assert torch.allclose(ref.state[pa]["momentum_buffer"], ours.state[pb]["momentum_buffer"])
    # the state is torch's: a BatchedMuon state_dict loads into torch's Muon
    torch.optim.Muon(_params(), **kw).load_state_dict(ours.state_dict())
