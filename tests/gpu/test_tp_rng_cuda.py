"""Dropout RNG of tensor-parallel regions on CUDA, on one GPU (TP ranks simulated in one process).

`pretrain.tensor_parallel.TensorParallelRNG(tp_rank).fork(device)` must reseed the generator that CUDA
dropout draws from (not only the CPU one), differently per TP rank, restore it on exit (so that
replicated regions stay in step across TP ranks), and be replayed exactly by activation
checkpointing.
"""
import contextlib

import torch
import torch.nn.functional as F

from pretrain.layers import LayerFactory
from pretrain.model import BertForPreTraining
from pretrain.tensor_parallel import TensorParallelRNG
from tests.gpu._common import CUDA, pretraining_batch, tiny_config, to_device, worst_grad_err

pytestmark = CUDA

N = 1 << 16


def _masks(tp_rank, rng_device="cuda", fork_device=None, seed=1234):
    """Dropout keep-masks of a CUDA tensor inside and after a fork, and the CUDA generator state
    before and after the region, from the same global seed (what every TP rank shares)."""
    torch.manual_seed(seed)
    x = torch.ones(N, device="cuda")
    rng = TensorParallelRNG(tp_rank, device=rng_device)
    before = torch.cuda.get_rng_state()
    with rng.fork(fork_device):
        inside = F.dropout(x, 0.5, training=True) != 0
    after = torch.cuda.get_rng_state()
    outside = F.dropout(x, 0.5, training=True) != 0
    return inside, outside, before, after


def test_fork_gives_each_tp_rank_its_own_cuda_mask():
    in0, out0, before0, after0 = _masks(0)
    in1, out1, before1, after1 = _masks(1)
    assert 0.45 < in0.float().mean().item() < 0.55 and 0.45 < in1.float().mean().item() < 0.55
    # independent masks on the two ranks' heads: about half the elements differ
    assert 0.4 < (in0 != in1).float().mean().item() < 0.6
    # the generator is restored on exit, so the replicated region after it draws the same mask
    assert torch.equal(before0, after0) and torch.equal(before1, after1)
    assert torch.equal(out0, out1)
    # a rank's stream is a function of the shared seed: the same rank again, the same mask
    again, _, _, _ = _masks(0)
    assert torch.equal(in0, again)
    # and the region does not just replay the unforked stream
    torch.manual_seed(1234)
    plain = F.dropout(torch.ones(N, device="cuda"), 0.5, training=True) != 0
    assert not torch.equal(in0, plain) and not torch.equal(in1, plain)


def test_fork_follows_the_device_of_the_activations():
    # The trainer builds the TP layers (and their RNG) on the CPU and moves the model to the GPU
    # afterwards: the device the model passes at run time decides which generator is forked.
    in0, _, b0, a0 = _masks(0, rng_device="cpu", fork_device=torch.device("cuda"))
    in1, _, b1, a1 = _masks(1, rng_device="cpu", fork_device=torch.device("cuda"))
    assert 0.4 < (in0 != in1).float().mean().item() < 0.6
    assert torch.equal(b0, a0) and torch.equal(b1, a1)
    # tp=1's factory: no fork at all, the CUDA stream is untouched
    torch.manual_seed(1234)
    plain = F.dropout(torch.ones(N, device="cuda"), 0.5, training=True) != 0
    torch.manual_seed(1234)
    with LayerFactory().sharded_rng(torch.device("cuda")):
        same = F.dropout(torch.ones(N, device="cuda"), 0.5, training=True) != 0
    assert torch.equal(plain, same)


class _ForkingFactory(LayerFactory):
    """tp=1 layers whose attention-dropout region forks the RNG as TP rank 1 would."""

    def __init__(self):
        self.rng = TensorParallelRNG(tp_rank=1, device="cuda")

    def sharded_rng(self, device=None):
        return self.rng.fork(device)


class _NonReplayingFactory(LayerFactory):
    """A broken region for the control: reseeds from a call counter, which a recomputation
    cannot replay."""

    def __init__(self):
        self.calls = 0

    @contextlib.contextmanager
    def sharded_rng(self, device=None):
        gen = torch.cuda.default_generators[torch.cuda.current_device()]
        outside = gen.get_state()
        self.calls += 1
        gen.manual_seed(1000 + self.calls)
        try:
            yield
        finally:
            gen.set_state(outside)


def _loss_and_grads(factory, checkpointing):
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config(dropout=0.1), factory)
    model.init_weights()
    model.cuda().train()
    model.bert.encoder.gradient_checkpointing = checkpointing
    batch = to_device(pretraining_batch(), "cuda")
    torch.manual_seed(42)  # one RNG state (CPU and CUDA) for the step in both runs
    out = model(**batch)
    out.loss.backward()
    return out.loss.item(), {n: p.grad for n, p in model.named_parameters()}


def test_activation_checkpointing_replays_forked_dropout_exactly():
    """Recomputation in backward must draw the dropout masks of the forward, forked region
    included. The forward is the same kernels on the same inputs, so the loss is bitwise equal;
    gradients get 1e-6: the attention kernel's backward may accumulate in another order between
    runs (rounding-level), while a replayed mask that differs changes gradients at order 1
    (the control below sees > 1e-2)."""
    loss_plain, grads_plain = _loss_and_grads(_ForkingFactory(), checkpointing=False)
    loss_ckpt, grads_ckpt = _loss_and_grads(_ForkingFactory(), checkpointing=True)
    assert loss_ckpt == loss_plain
    err, name = worst_grad_err(grads_ckpt, grads_plain)
    assert err < 1e-6, f"gradient of {name}: relative error {err:.2e}"

    # Control: a region that recomputation cannot replay gives the same loss, other gradients.
    loss_a, grads_a = _loss_and_grads(_NonReplayingFactory(), checkpointing=False)
    loss_b, grads_b = _loss_and_grads(_NonReplayingFactory(), checkpointing=True)
    assert loss_a == loss_b
    err, _ = worst_grad_err(grads_b, grads_a)
    assert err > 1e-2
