"""edgetrain.lut: LUTNet's K-input LUT layer and Logic Shrinkage against exact references.

* the layer's forward equals a slow truth-table lookup (address per LUT, read the shrunk table) with tolerance 0 in
  float64 for binary inputs, in binarised and full-precision coefficient modes, with removed inputs and pruned LUTs;
* gradients: gradcheck in float64 of the output w.r.t. the table and gamma (full-precision mode), the STE by hand,
  the input gradient of a 2-LUT layer by hand;
* saliency equals a slow pairwise loop; the shrinkage map equals averaging by hand; the layer's averaging equals
  the map; a removed input no longer changes the output (a kept one does);
* the global ranking, LUT pruning, monotone staged shrinkage, statistics by hand; logic expansion reproduces the BNN;
* one-line refusals.

Values are dyadic rationals (multiples of 1/64, residual means 3/4 and 1/4) so every float64 sum is exact whatever
its order: tolerance 0 is meaningful.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from edgetrain.errors import ConfigError
from edgetrain.lut import (
    LUTMLP,
    BinaryLinear,
    LUTLayer,
    ResidualSign,
    average_out,
    expand,
    layer_stats,
    magnitude_prune_,
    saliency,
    select_removals,
    shrink_,
    shrinkage_map,
    sign_ste,
)

G = (0.75, 0.25)  # residual level magnitudes (dyadic)


def dyadic(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random multiples of 1/64 in (-1, 1), float64, none zero."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(1, 64, shape, generator=g).double() / 64
    return v * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()


def binary_input(batch: int, levels: int, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.where(torch.rand(batch, levels, n, generator=g) < 0.5, -1.0, 1.0).double()
    return s * torch.tensor(G[:levels], dtype=torch.float64).view(1, levels, 1)


def layer(n_in: int, n_out: int, k: int, levels: int = 2, binary: bool = True, seed: int = 0) -> LUTLayer:
    lay = LUTLayer(n_in, n_out, k, levels, binary=binary, seed=seed).double()
    with torch.no_grad():
        lay.table.copy_(dyadic(*lay.table.shape, seed=seed))
        lay.gamma.fill_(0.5)
    return lay


def hand_average(row: list[float], k: int, removed: list[bool]) -> list[float]:
    """A table row with the removed inputs averaged out: entry p = mean of entries agreeing with p on kept bits."""
    keep = sum(1 << (k - 1 - i) for i in range(k) if not removed[i])
    out = []
    for p in range(2 ** k):
        same = [row[q] for q in range(2 ** k) if q & keep == p & keep]
        out.append(sum(same) / len(same))
    return out


def lookup_reference(lay: LUTLayer, x: torch.Tensor) -> torch.Tensor:
    """Slow definition: per sample, output and LUT, the binary address of its K inputs, read the shrunk table."""
    k, levels = lay.k, lay.levels
    y = torch.zeros(x.shape[0], lay.out_features, dtype=torch.float64)
    gamma = abs(float(lay.gamma.detach()))
    for b, j, i in itertools.product(range(x.shape[0]), range(lay.out_features), range(lay.in_features)):
        if lay.node_mask[i, j] == 0:
            continue
        removed = [bool(lay.removed[m, i, j]) for m in range(k)]
        for level in range(levels):
            row = hand_average([float(lay.table.detach()[level, p, i, j]) for p in range(2 ** k)], k, removed)
            addr = sum((1 << (k - 1 - m)) for m in range(k) if float(x[b, level, lay.index[m, i]]) < 0)
            c = row[addr]
            c = (1.0 if c >= 0 else -1.0) if lay.binary else min(1.0, max(-1.0, c))
            y[b, j] += gamma * abs(float(x[b, level, i])) * c
    return y


@pytest.mark.parametrize("k,binary", [(2, True), (3, False), (4, True), (4, False)])
def test_forward_equals_truth_table_lookup(k: int, binary: bool) -> None:
    lay = layer(7, 3, k, binary=binary, seed=k)
    with torch.no_grad():
        lay.removed[:, 0, 0] = True  # every input of one LUT removed: a constant table
        lay.removed[1, 2, 1] = lay.removed[0, 4, 2] = lay.removed[k - 1, 5, 0] = True
        lay.node_mask[3, 1] = lay.node_mask[6, 2] = 0
    x = binary_input(5, 2, 7)
    assert torch.equal(lay(x), lookup_reference(lay, x))


def test_forward_reads_address_msb_first() -> None:
    """One LUT, K=3, table = its own address: the output is the address of (anchor, extra1, extra2) as MSB..LSB."""
    idx = torch.tensor([[0, 1, 2], [1, 2, 0], [2, 0, 1]])
    lay = LUTLayer(3, 1, 3, 1, binary=False, index=idx).double()
    with torch.no_grad():
        lay.table.copy_(torch.arange(8, dtype=torch.float64).view(1, 8, 1, 1).expand(1, 8, 3, 1) / 8)
        lay.node_mask.zero_()
        lay.node_mask[0, 0] = 1
    x = torch.tensor([[[-1.0, 1.0, -1.0]]], dtype=torch.float64)  # anchor neg (1), x1 pos (0), x2 neg (1) -> 0b101
    assert float(lay(x).detach()) == 5 / 8


def test_sign_ste_by_hand() -> None:
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    y.backward(torch.arange(1.0, 8.0, dtype=torch.float64))
    assert x.grad.tolist() == [0, 2, 3, 4, 5, 6, 0]


def test_gradcheck_table_and_gamma_full_precision() -> None:
    lay = layer(5, 2, 3, binary=False, seed=3)
    with torch.no_grad():
        lay.table.mul_(0.9)  # away from the clip's kinks at +-1
        lay.removed[1, 0, 1] = True
    x = binary_input(3, 2, 5)

    def f(table: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(lay, {"table": table, "gamma": gamma}, (x,))

    assert torch.autograd.gradcheck(f, (lay.table.detach().clone().requires_grad_(),
                                        torch.tensor(0.7, dtype=torch.float64, requires_grad=True)))


def test_input_gradient_by_hand() -> None:
    """K=2, two inputs, one output, one level, full precision: d y / d x from the multilinear form with the STE."""
    idx = torch.tensor([[0, 1], [1, 0]])
    lay = LUTLayer(2, 1, 2, 1, binary=False, index=idx).double()
    ca, cb = [0.5, -0.25, 0.75, -0.5], [0.125, 0.375, -0.625, 0.25]  # tables of LUT(anchor 0) and LUT(anchor 1)
    with torch.no_grad():
        lay.table.copy_(torch.tensor([ca, cb], dtype=torch.float64).T.reshape(1, 4, 2, 1))
    x = torch.tensor([[[0.5, -0.25]]], dtype=torch.float64, requires_grad=True)
    lay(x).sum().backward()
    # LUT A: anchor factors fa = (0.5, 0), d/dx0 = (1.25, -0.25); extra factors fe = (0, 1), d/dx1 = (0.5, -0.5)
    # LUT B: anchor factors fa' = (0, 0.25), d/dx1 = (0.125, -1.125); extra fe' = (1, 0), d/dx0 = (0.5, -0.5)
    d0 = ca[1] * 1.25 + ca[3] * -0.25 + cb[2] * 0.25 * 0.5 + cb[3] * 0.25 * -0.5
    d1 = ca[0] * 0.5 * 0.5 + ca[1] * 0.5 * -0.5 + cb[0] * 0.125 + cb[2] * -1.125
    assert x.grad.flatten().tolist() == [d0, d1]


@pytest.mark.parametrize("k", [2, 3, 4])
def test_saliency_equals_pairwise_reference(k: int) -> None:
    table = dyadic(2, 2 ** k, 4, 3, seed=k)
    want = torch.zeros(k, 4, 3, dtype=torch.float64)
    for m, p, q in itertools.product(range(k), range(2 ** k), range(2 ** k)):
        if p < q and p ^ q == 1 << (k - 1 - m):
            want[m] += (table[:, p] - table[:, q]).abs().sum(0)
    assert torch.equal(saliency(table), want)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_shrinkage_map_equals_hand_averaging(k: int) -> None:
    for pattern in itertools.product([False, True], repeat=k):
        cols = [hand_average([float(q == p) for q in range(2 ** k)], k, list(pattern)) for p in range(2 ** k)]
        want = torch.tensor(cols, dtype=torch.float64)  # row p: how entry p spreads, i.e. M[p, :]
        assert torch.equal(shrinkage_map(k, list(pattern)), want), pattern


def test_average_out_equals_map_per_lut() -> None:
    k = 4
    table = dyadic(2, 16, 5, 3, seed=7)
    removed = torch.rand(k, 5, 3, generator=torch.Generator().manual_seed(2)) < 0.4
    got = average_out(table, removed)
    for i, j in itertools.product(range(5), range(3)):
        m = shrinkage_map(k, removed[:, i, j].tolist())
        assert torch.equal(got[:, :, i, j], table[:, :, i, j] @ m)


def test_removed_input_no_longer_matters() -> None:
    idx = torch.stack([torch.arange(6), torch.tensor([1, 0, 3, 2, 5, 4]), torch.tensor([2, 3, 4, 5, 0, 1]),
                       torch.tensor([3, 4, 5, 0, 1, 2])])
    for binary in (True, False):
        lay = LUTLayer(6, 1, 4, 2, binary=binary, index=idx).double()
        with torch.no_grad():
            lay.table.copy_(dyadic(2, 16, 6, 1, seed=11))
            lay.node_mask.zero_()
            lay.node_mask[0, 0] = 1  # only LUT (0, 0): inputs 0, 1, 2, 3
            lay.removed[2, 0, 0] = True  # forget its input 2
        x = binary_input(16, 2, 6, seed=5)
        for src, matters in ((2, False), (1, True), (4, False)):  # input 4 is not read by LUT (0, 0) at all
            flipped = x.clone()
            flipped[:, :, src] *= -1
            changed = not torch.equal(lay(x), lay(flipped))
            assert changed == matters, (binary, src)


def test_global_ranking_prunes_and_is_monotone() -> None:
    lay = LUTLayer(3, 2, 2, 1, binary=False).double()
    # saliency(input m, LUT (i, j)) = 2 * |c_p - c_q| summed over the pairs: set tables for known scores
    sal = torch.tensor([[[1.0, 8.0], [3.0, 5.0], [7.0, 2.0]], [[6.0, 4.0], [0.5, 9.0], [10.0, 11.0]]])
    with torch.no_grad():
        # K=2 address pairs: input 0 (bit 1): (0,2), (1,3); input 1 (bit 0): (0,1), (2,3). c = (a, b, c, d)
        # choose c0 = 0, c1 = s1 / 2, c2 = s0 / 2, c3 = (s0 + s1) / 2: input 0 pairs give s0/2 each, input 1 s1/2 each
        s0, s1 = sal[0], sal[1]
        lay.table.copy_(torch.stack([torch.zeros_like(s0), s1 / 2, s0 / 2, (s0 + s1) / 2]).unsqueeze(0))
        lay.node_mask[2, 1] = 0  # a dead LUT: its inputs (7 and 11... scores 2, 11) never count
    assert torch.equal(saliency(lay.shrunk_table()), sal.double())
    stats = shrink_(lay, 0.5)  # 5 alive LUTs, 10 inputs: remove the 5 lowest: 0.5, 1, 3, 4, 5
    want = torch.zeros(2, 3, 2, dtype=torch.bool)
    want[1, 1, 0] = want[0, 0, 0] = want[0, 1, 0] = want[1, 0, 1] = want[0, 1, 1] = True
    assert torch.equal(lay.removed, want)
    assert lay.node_mask.tolist() == [[1, 1], [0, 1], [1, 0]]  # LUT (1, 0) lost both inputs: pruned
    assert stats["luts"] == 4 and stats["k_hist"] == {"0": 0, "1": 3, "2": 1} and stats["params"] == 3 * 2 + 4
    before = lay.removed.clone()
    shrink_(lay, 0.75)  # 4 alive LUTs, 8 inputs, quota 6: the 3 still removed in alive LUTs + the next 3
    assert bool((lay.removed | ~before).all()) and int(lay.removed.sum()) == 5 + 3


def test_select_removals_never_picks_dead_luts() -> None:
    scores = torch.tensor([[0.0, 5.0], [1.0, 2.0]])
    alive = torch.tensor([False, True])
    got = select_removals(scores, alive, torch.zeros(2, 2, dtype=torch.bool), 0.5)
    assert got.tolist() == [[False, False], [False, True]]


def test_select_removals_counts_already_removed_first() -> None:
    """An input removed at an earlier stage fills the quota before a lower-scored one (removal is monotone and the
    quota is the layer's total, not an increment)."""
    scores = torch.tensor([[0.0, 3.0], [5.0, 6.0]])  # 2 LUTs, K = 2: quota round(0.25 * 4) = 1
    already = torch.tensor([[False, True], [False, False]])
    got = select_removals(scores, torch.tensor([True, True]), already, 0.25)
    assert got.tolist() == [[False, True], [False, False]]


def test_layer_stats_by_hand() -> None:
    lay = LUTLayer(2, 2, 4, 2)
    with torch.no_grad():
        lay.removed[:2, 0, 1] = True  # K = 2
        lay.removed[:3, 1, 0] = True  # K = 1
        lay.node_mask[1, 1] = 0
    s = layer_stats(lay)
    assert s["luts"] == 3 and s["k_hist"] == {"0": 0, "1": 1, "2": 1, "3": 0, "4": 1}
    assert s["params"] == (16 + 4 + 2) * 2 and s["inputs"] == 7
    assert s["anchor_kept"] == 1 and s["k1_anchor_only"] == 0  # LUTs (0, 1), (1, 0) lost their anchor (input 0)
    with torch.no_grad():
        lay.removed[:, 1, 0] = torch.tensor([False, True, True, True])  # K = 1, the anchor kept
    s = layer_stats(lay)
    assert s["anchor_kept"] == 2 and s["k1_anchor_only"] == 1


def test_expansion_reproduces_bnn_exactly() -> None:
    torch.manual_seed(0)
    bnn = BinaryLinear(6, 4).double()
    with torch.no_grad():
        bnn.node_mask[0, 1] = bnn.node_mask[5, 3] = 0
        bnn.gamma.fill_(0.5)
    lay = LUTLayer(6, 4, 3, 2, seed=1).double()
    lay.expand_from(bnn)
    x = binary_input(8, 2, 6, seed=3)
    assert torch.equal(lay(x), bnn(x))


def test_model_expansion_and_pruning() -> None:
    torch.manual_seed(0)
    bnn = LUTMLP((12, 8, 8, 3)).double().eval()
    magnitude_prune_(bnn, 0.5)
    assert [int(m.node_mask.sum()) for m in bnn.targets()] == [32, 12]
    x = torch.randn(5, 12, dtype=torch.float64)
    lut = expand(bnn, 4).double().eval()
    assert torch.allclose(lut(x), bnn(x), rtol=0, atol=1e-12)


def test_residual_sign_two_levels_by_hand() -> None:
    rs = ResidualSign(2).double()
    y = rs(torch.tensor([[0.5, -0.1]], dtype=torch.float64))
    # means 2/3, 1/3: level 0 = sign(x) 2/3; residual 0.5 - 2/3 < 0, -0.1 + 2/3 > 0 -> level 1 = -1/3, +1/3
    assert torch.allclose(y, torch.tensor([[[2 / 3, -2 / 3], [-1 / 3, 1 / 3]]], dtype=torch.float64))


@pytest.mark.parametrize("make,match", [
    (lambda: LUTLayer(4, 2, 1), r"LUT K: must be an int in \[2, 6\].*got 1"),
    (lambda: LUTLayer(4, 2, 7), r"LUT K: .*got 7"),
    (lambda: LUTLayer(4, 2, "4"), r"LUT K: .*got '4'"),
    (lambda: LUTLayer(4, 2, 3, levels=0), r"LUT levels: .*got 0"),
    (lambda: LUTLayer(4, 2, 3, index=torch.zeros(2, 4, dtype=torch.long)), r"index: shape \(2, 4\) does not match"),
    (lambda: LUTLayer(4, 2, 2, index=torch.tensor([[0, 1, 2, 3], [0, 1, 2, 9]])), r"index: must hold input"),
    (lambda: shrink_(LUTLayer(4, 2, 2), 1.0), r"delta: must be a number in \[0, 1\).*got 1.0"),
    (lambda: shrink_(LUTLayer(4, 2, 2), -0.1), r"delta: .*got -0.1"),
    (lambda: shrink_(LUTLayer(4, 2, 2), float("nan")), r"delta: .*got nan"),
    (lambda: LUTLayer(4, 2, 2)(torch.zeros(3, 2, 5)), r"input of shape \(3, 2, 5\) does not match .*\(batch, 2, 4\)"),
    (lambda: LUTLayer(4, 2, 2)(torch.zeros(3, 1, 4)), r"input of shape \(3, 1, 4\) does not match"),
    (lambda: LUTLayer(4, 2, 2).expand_from(BinaryLinear(5, 2)), r"BinaryLinear 5x2 does not match .* 4x2"),
    (lambda: shrinkage_map(3, [True, False]), r"removed has shape \(2,\), expected \(3,\)"),
    (lambda: magnitude_prune_(LUTMLP((4, 3, 2)), 1.5), r"theta: must be a number in \[0, 1\).*got 1.5"),
])
def test_refusals_are_one_line(make, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        make()
    assert "\n" not in str(e.value)
