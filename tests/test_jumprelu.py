"""JumpReLU math: forward values and the straight-through pseudo-derivatives, against numbers
derived by hand from Rajamanoharan et al. 2024 (arXiv 2407.14435) §3 with K(u) = 1[|u| < 1/2]."""

import pytest
import torch

from dictionary_learning.jumprelu import (
    JumpReLUFunction,
    StepFunction,
    reconstruction_loss,
    rectangle,
    sparsity_loss,
)
from dictionary_learning.pairs import bags, candidates, flat_nonzero, segment_sums, sum_by

EPS = 0.001
# One latent, θ = 0.1, three tokens: u = (z − θ)/ε = 0.4 (inside window, active),
# −0.4 (inside window, inactive), 0.6 (outside window, active).
Z = [[0.1004], [0.0996], [0.1006]]
G = [[2.0], [1.0], [5.0]]


def _leaf(v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype, requires_grad=True)


def test_rectangle_is_open_unit_box():
    u = torch.tensor([-0.6, -0.5, -0.49, 0.0, 0.49, 0.5, 0.6])
    assert rectangle(u).tolist() == [0, 0, 1, 1, 1, 0, 0]


def test_jumprelu_forward_values():
    z = torch.tensor([[-1.0, 0.05, 0.1, 0.2], [0.3, 0.0, 0.1001, 5.0]])
    th = torch.tensor([0.1, 0.1, 0.1, 0.1])
    f = JumpReLUFunction.apply(z, th, EPS)
    # strict inequality: z == θ gives 0
    assert f.flatten().tolist() == pytest.approx([0.0, 0.0, 0.0, 0.2, 0.3, 0.0, 0.1001, 5.0])


def test_jumprelu_backward_hand_derived():
    z, th = _leaf(Z), _leaf([0.1])
    f = JumpReLUFunction.apply(z, th, EPS)
    (f * torch.tensor(G)).sum().backward()
    # ∂/∂z = H(z − θ)·g = [2, 0, 5]; ∂/∂θ = Σ −(θ/ε)·K·g = −100·(2 + 1) = −300
    assert z.grad.flatten().tolist() == [2.0, 0.0, 5.0]
    assert th.grad.tolist() == pytest.approx([-300.0], rel=1e-4)


def test_step_forward_and_backward_hand_derived():
    z, th = _leaf(Z), _leaf([0.1])
    h = StepFunction.apply(z, th, EPS)
    assert h.flatten().tolist() == [1.0, 0.0, 1.0]
    (h * torch.tensor(G)).sum().backward()
    # ∂/∂z = 0; ∂/∂θ = Σ −(1/ε)·K·g = −1000·(2 + 1) = −3000 (the inactive token in the window
    # counts: the step is applied to the pre-activations, not to f, dictionary_learning bug #55)
    assert z.grad is None or not z.grad.any()
    assert th.grad.tolist() == pytest.approx([-3000.0], rel=1e-4)
    z2 = _leaf(Z)  # through the step and something else: the step adds nothing to z's gradient
    (StepFunction.apply(z2, th, EPS) + 3 * z2).sum().backward()
    assert z2.grad.flatten().tolist() == [3.0, 3.0, 3.0]


def test_threshold_grad_summed_over_all_leading_dims():
    z = torch.full((2, 3, 1), 0.1002)
    th = _leaf([0.1])
    StepFunction.apply(z, th, EPS).sum().backward()
    assert th.grad.tolist() == pytest.approx([-6000.0], rel=1e-4)  # 6 tokens in the window


def test_bf16_activations_fp32_threshold():
    z = _leaf([[0.5, -0.5]], dtype=torch.bfloat16)
    th = _leaf([0.25, 0.25])
    f = JumpReLUFunction.apply(z, th, 0.5)
    assert f.dtype == torch.bfloat16
    f.sum().backward()
    assert th.grad.dtype == torch.float32
    # u = (0.5 − 0.25)/0.5 = 0.5 -> K = 0 (open box); u = −1.5 -> 0
    assert th.grad.tolist() == [0.0, 0.0]
    assert z.grad.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("bw", [0.0, -0.1])
def test_bandwidth_must_be_positive(bw):
    with pytest.raises(ValueError, match="bandwidth"):
        JumpReLUFunction.apply(torch.zeros(1, 1), torch.zeros(1), bw)
    with pytest.raises(ValueError, match="bandwidth"):
        StepFunction.apply(torch.zeros(1, 1), torch.zeros(1), bw)


def test_reconstruction_loss_sums_dims_means_batch():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert reconstruction_loss(x, torch.zeros_like(x)).item() == pytest.approx((1 + 4 + 9 + 16) / 2)


def test_sparsity_losses():
    l0 = torch.tensor(30.0)
    assert sparsity_loss(l0, "l0", 0.5).item() == pytest.approx(15.0)
    assert sparsity_loss(l0, "target_l0", 2.0, target_l0=20).item() == pytest.approx(2.0 * 0.25)
    with pytest.raises(ValueError, match="target_l0"):
        sparsity_loss(l0, "target_l0", 1.0)
    with pytest.raises(ValueError, match="unknown sparsity mode"):
        sparsity_loss(l0, "l1", 1.0)


@pytest.mark.parametrize("shape", [(64, 40), (7, 13), (1, 3)])
@pytest.mark.parametrize("p", [0.0, 0.02, 0.5, 1.0])
def test_flat_nonzero_matches_nonzero(shape, p):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(shape, generator=g) < p
    assert torch.equal(flat_nonzero(mask), mask.reshape(-1).nonzero().squeeze(1))


@pytest.mark.parametrize("chunk_bytes", [1, 40, 1 << 21])  # one row, several rows, everything
@pytest.mark.parametrize("two_sided", [False, True])
def test_candidates_match_mask(chunk_bytes, two_sided):
    """(rows, cols, values) of the pairs in (lo, hi), row-major; m = 37 is not a multiple of 8 (the
    scan's word size); NaN is never a candidate; None once more than max_count are found."""
    g = torch.Generator().manual_seed(1)
    xW = torch.randn(29, 37, generator=g)
    xW[3, 5] = float("nan")
    lo = torch.randn(37, generator=g)
    hi = lo + torch.rand(37, generator=g) if two_sided else None
    mask = (xW > lo) & (xW < hi) if two_sided else xW > lo
    assert 0 < mask.sum() < mask.numel()
    rows, cols, values = candidates(xW, lo, hi, chunk_bytes=chunk_bytes)
    want = mask.nonzero()
    assert rows.dtype == cols.dtype == torch.int32
    assert torch.equal(rows.long(), want[:, 0]) and torch.equal(cols.long(), want[:, 1])
    assert torch.equal(values, xW[mask])
    n = int(mask.sum())
    assert candidates(xW, lo, hi, max_count=n, chunk_bytes=chunk_bytes) is not None
    assert candidates(xW, lo, hi, max_count=n - 1, chunk_bytes=chunk_bytes) is None


def test_bags_into_out_match_direct_sums():
    g = torch.Generator().manual_seed(2)
    src = torch.randn(9, 5, generator=g)
    counts = torch.tensor([0, 3, 1, 0, 4, 2, 0])  # empty bags too, and an empty block
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    idx = torch.randint(0, 9, (int(counts.sum()),), generator=g)
    w = torch.randn(idx.numel(), generator=g)
    want = torch.stack([(w[s:e, None] * src[idx[s:e]]).sum(0) for s, e in zip(offsets[:-1], offsets[1:])])
    out = torch.full((7, 5), float("nan"))  # garbage in `out` must not leak into the result
    got = bags(offsets, idx, w, src, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(bags(offsets, idx, w, src), want)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_segment_sums_match_index_add(dtype):
    """The GPU path of sum_by (stable sort + per-segment sums, deterministic) gives the sums that
    index_add_ gives, empty segments included; on CPU sum_by is index_add_ itself."""
    g = torch.Generator().manual_seed(3)
    index = torch.randint(0, 9, (200,), generator=g).to(dtype)
    index[index == 4] = 5  # id 4 never occurs
    values = torch.randn(200, generator=g, dtype=torch.float64)
    want = torch.zeros(11, dtype=torch.float64).index_add_(0, index, values)
    torch.testing.assert_close(segment_sums(index, values, 11), want)
    assert want[4] == 0 and want[9:].eq(0).all()
    assert torch.equal(sum_by(index, values, 11), want)
