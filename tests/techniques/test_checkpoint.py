from __future__ import annotations

import torch
from torch import nn

import edgetrain as et
from edgetrain.measure import measure


def _sum(out, y):
    return out.sum()


def test_checkpointed_blocks_save_only_their_inputs():
    torch.manual_seed(0)
    B, d = 8, 32
    model = nn.Sequential(*[nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(4)])
    model.block_names = ["0", "1", "2", "3"]
    x = torch.randn(B, d)
    plain = measure(model, x, _sum, repeats=1)
    # plain: each Linear saves its input, each Tanh its output; Linear k+1's input is Tanh k's output.
    assert plain.saved_bytes == (1 + 4) * B * d * 4
    ck = measure(model, x, _sum, recipe=et.Checkpoint(), repeats=1)
    # checkpointed: the 4 block inputs only (x and the outputs of blocks 0-2), and each block's CPU RNG state (for
    # dropout in the recomputation: torch's Mersenne Twister state is 5,056 bytes)
    rng = torch.get_rng_state().numel()
    assert ck.saved_bytes == 4 * B * d * 4 + 4 * rng and ck.hidden_bytes == 0
    assert ck.peak_bytes < plain.peak_bytes + 64 * 1024  # recompute happens block by block


def test_checkpoint_cuts_the_peak_of_a_deep_stack():
    torch.manual_seed(0)
    B, d, n = 512, 128, 12  # activations (about 6 MiB) dominate parameters (1.6 MiB)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d), nn.Tanh()) for _ in range(n)])
    model.block_names = [str(i) for i in range(n)]
    x = torch.randn(B, d)
    act = B * d * 4
    plain = measure(model, x, _sum, repeats=1)
    assert plain.saved_bytes == (1 + 2 * n) * act  # x, then two Tanh outputs per block (Linear inputs shared)
    ck = measure(model, x, _sum, recipe=et.Checkpoint(), repeats=1)
    assert ck.saved_bytes == n * act + n * torch.get_rng_state().numel()  # the block inputs and RNG states
    # the peak drops by (almost) the activations no longer held; one block is recomputed at a time
    assert ck.peak_bytes < plain.peak_bytes - (n - 4) * act


def test_dropout_in_a_checkpointed_block_gets_the_same_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 4)), nn.Linear(4, 4))
    x = torch.randn(8, 16)
    torch.manual_seed(1)
    ref = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    with et.apply_(model, et.Checkpoint(targets=["0"]), x):
        torch.manual_seed(1)
        got = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
