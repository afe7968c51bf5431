"""On a GPU, `pretrain.optim.build_optimizer(..., "adamw")` is torch's fused AdamW, and it steps
like torch's plain (for-loop) AdamW on the same gradients."""
import copy

import torch

from pretrain.model import BertForPreTraining
from pretrain.optim import build_optimizer, param_groups
from tests.gpu._common import CUDA, tiny_config

pytestmark = CUDA


def test_adamw_on_cuda_is_fused_and_matches_the_unfused_step():
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config(dropout=0.0))
    model.init_weights()
    model.cuda()
    reference = copy.deepcopy(model)
    opt = build_optimizer(model, "adamw", lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-6)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["fused"] is True

    groups = param_groups(reference, 0.1)
    for g in groups:
        g.pop("names")
    ref_opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, fused=False, foreach=False)
    start = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, device="cuda", generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for (name, p), q, p0 in zip(model.named_parameters(), reference.parameters(), start):
        # Three steps of ~1e-2 each plus weight decay of 1e-3 x |w| per step: the two kernels
        # agree to about one ulp of the parameter (6e-8 at |w| = 1; fused vs for-loop on the CPU
        # differed by at most that), while a missing decay or a wrong bias correction is off by
        # >= 1e-5.
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
        assert (p.detach() - p0).abs().max().item() > 1e-3, f"{name} did not move"
        assert torch.isfinite(p).all()
