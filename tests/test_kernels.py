"""The fused CPU kernels (kernels.cpp): they build where there is a compiler, equal a float64
reference, give the same bits whatever the thread count, refuse bad input by name, and fall back
to torch ops (with a warning) when they cannot be built or are switched off."""

import os
import platform
import shutil

import pytest
import torch

from dictionary_learning import kernels


@pytest.fixture(scope="module")
def ops():
    if kernels.cpu_ops() is None:
        pytest.skip(
            "the C++ kernels did not build here; test_kernels_build_where_there_is_a_compiler says why"
        )
    return kernels.cpu_ops()


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_kernels_build_where_there_is_a_compiler():
    if platform.system() != "Linux" or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler on PATH (or not Linux): the torch-op fallback is what runs here")
    if os.environ.get("SAE_KERNELS") == "0":
        pytest.skip("switched off by SAE_KERNELS=0")
    assert kernels.cpu_ops() is not None, "kernels.cpp did not build; see the RuntimeWarning"


def _pairs(B, m, per_row, seed):
    """Random CSR pairs: per_row[b] latents for token b (distinct, ascending), int32."""
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randperm(m, generator=g)[:k].sort().values for k in per_row]
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(per_row).cumsum(0)
    return offsets, torch.cat(cols).int()


@pytest.mark.parametrize("d", [70, 128])  # 70: not a multiple of the 16- and 64-float blocks
def test_decode_grad_equals_float64_reference(ops, d):
    B, m = 23, 50
    g = torch.Generator().manual_seed(0)
    per_row = torch.randint(0, 12, (B,), generator=g).tolist()
    per_row[4] = 0  # a token with no candidates: x̂ = b_dec
    offsets, cols = _pairs(B, m, per_row, seed=1)
    n = cols.numel()
    f = torch.randn(n, generator=g).clamp_min(0)  # about half 0: inactive candidates
    W_dec, b_dec, x = (
        torch.randn(m, d, generator=g),
        torch.randn(d, generator=g),
        torch.randn(B, d, generator=g),
    )
    x_hat, err = torch.full((B, d), float("nan")), torch.full((B, d), float("nan"))
    g_f = ops.decode_grad(offsets, cols, f, W_dec, b_dec, x, 0.25, x_hat, err)

    rows = torch.repeat_interleave(torch.arange(B), torch.tensor(per_row))
    dense = torch.zeros(B, m, dtype=torch.float64)
    dense[rows, cols.long()] = f.double()
    want_x_hat = dense @ W_dec.double() + b_dec.double()
    want_err = want_x_hat - x.double()
    want_g_f = 0.25 * (want_err @ W_dec.double().T)[rows, cols.long()]
    torch.testing.assert_close(x_hat.double(), want_x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(err.double(), want_err, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_f.double(), want_g_f, rtol=1e-5, atol=1e-5)
    assert torch.equal(x_hat[4], b_dec)


def test_same_bits_whatever_the_thread_count(ops, threads):
    """Each output is summed in a fixed order, so exact resume holds on any number of threads."""
    g = torch.Generator().manual_seed(5)
    B, m, d = 300, 1024, 40  # 1024 columns: 64-row chunks, so the scan is split between threads
    xW, lo = torch.randn(B, m, generator=g), torch.full((m,), 1.5)
    W_dec, b_dec, x = (
        torch.randn(m, d, generator=g),
        torch.randn(d, generator=g),
        torch.randn(B, d, generator=g),
    )
    results = []
    for n_threads in (1, 2):
        torch.set_num_threads(n_threads)
        rows, cols, z, n = ops.candidates(xW, lo, None, -1)
        offsets = torch.zeros(B + 1, dtype=torch.int64)
        offsets[1:] = torch.bincount(rows, minlength=B).cumsum(0)
        x_hat, err = torch.empty(B, d), torch.empty(B, d)
        g_f = ops.decode_grad(offsets, cols, z, W_dec, b_dec, x, 1.0, x_hat, err)
        results.append((rows, cols, z, x_hat, err, g_f))
    assert results[0][0].numel() > B  # several candidates per row
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_bad_input_is_refused_by_name(ops):
    xW, lo = torch.randn(4, 8), torch.zeros(8)
    with pytest.raises(RuntimeError, match="xW must be a contiguous fp32 CPU tensor"):
        ops.candidates(xW.double(), lo, None, -1)
    with pytest.raises(RuntimeError, match="xW must be a contiguous fp32 CPU tensor"):
        ops.candidates(xW.T, lo, None, -1)
    with pytest.raises(RuntimeError, match=r"lo/hi must be \[m\]"):
        ops.candidates(xW, torch.zeros(7), None, -1)
    offsets, cols = torch.tensor([0, 1, 1, 2, 2]), torch.tensor([3, 9], dtype=torch.int32)  # 9 >= m = 8
    args = (torch.ones(2), torch.randn(8, 5), torch.zeros(5), torch.randn(4, 5), 1.0, torch.empty(4, 5))
    with pytest.raises(RuntimeError, match="latent index out of range"):
        ops.decode_grad(offsets, cols, *args, torch.empty(4, 5))
    with pytest.raises(RuntimeError, match="t_offsets must run from 0 to the number of pairs, 2"):
        ops.decode_grad(torch.tensor([0, 1, 1, 1, 1]), cols, *args, torch.empty(4, 5))
    with pytest.raises(RuntimeError, match="t_offsets must not decrease"):
        ops.decode_grad(torch.tensor([0, 3, 1, 2, 2]), cols, *args, torch.empty(4, 5))
    with pytest.raises(RuntimeError, match="t_offsets must be a contiguous int64 CPU tensor"):
        ops.decode_grad(torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])[::2], cols, *args, torch.empty(4, 5))
    with pytest.raises(RuntimeError, match=r"cols must be a contiguous int32 CPU tensor \[2\]"):
        ops.decode_grad(offsets, cols.long(), *args, torch.empty(4, 5))
    with pytest.raises(RuntimeError, match=r"b_dec \[d\]"):  # a [1] b_dec would be read past its end
        ops.decode_grad(offsets, cols, args[0], args[1], torch.zeros(1), *args[3:], torch.empty(4, 5))
    with pytest.raises(RuntimeError, match="offsets must not decrease"):
        ops.bags(
            torch.tensor([0, 5, 2], dtype=torch.int32),
            cols,
            torch.ones(2),
            torch.randn(8, 5),
            torch.empty(2, 5),
        )


def test_only_contiguous_fp32_cpu_tensors_use_the_kernels(ops):
    a = torch.zeros(4, 4)
    assert kernels.ops_for(a, a[0]) is ops
    assert kernels.ops_for(a, a.double()) is None
    assert kernels.ops_for(a.T) is None


def test_switched_off_or_failed_build_falls_back_to_torch_ops(monkeypatch):
    monkeypatch.delitem(kernels._state, "ops", raising=False)
    monkeypatch.setenv("SAE_KERNELS", "0")
    assert kernels.cpu_ops() is None
    monkeypatch.delitem(kernels._state, "ops")
    monkeypatch.delenv("SAE_KERNELS")

    def broken():
        raise RuntimeError("Error building extension 'sae_kernels'\nc++: not found")

    monkeypatch.setattr(kernels, "_build", broken)
    with pytest.warns(RuntimeWarning, match=r"sae kernels: not built \(c\+\+: not found\); using torch ops"):
        assert kernels.cpu_ops() is None
    assert kernels.cpu_ops() is None  # tried once per process


def test_bags_equal_embedding_bag(ops):
    """Into out (overwritten), empty bags and zero weights included, d not a multiple of 16."""
    g = torch.Generator().manual_seed(7)
    src = torch.randn(30, 19, generator=g)
    counts = torch.tensor([0, 5, 1, 0, 9, 2, 0, 13])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0).int()])
    idx = torch.randint(0, 30, (int(counts.sum()),), generator=g, dtype=torch.int32)
    w = torch.randn(idx.numel(), generator=g) * (torch.rand(idx.numel(), generator=g) > 0.3)
    out = torch.full((8, 19), float("nan"))
    ops.bags(offsets, idx, w, src, out)
    want = torch.nn.functional.embedding_bag(
        idx.long(), src, offsets[:-1].long(), mode="sum", per_sample_weights=w
    )
    torch.testing.assert_close(out, want)
    with pytest.raises(RuntimeError, match="row index out of range"):
        ops.bags(offsets, torch.full_like(idx, 30), w, src, out)


def test_unit_norm_row_ops_equal_their_formulas(ops):
    g = torch.Generator().manual_seed(8)
    W, grad = torch.randn(37, 70, generator=g), torch.randn(37, 70, generator=g)
    want = grad.double() - (grad.double() * W.double()).sum(1, keepdim=True) * W.double()
    ops.remove_parallel(grad, W)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-5)
    want = W.double() / W.double().norm(dim=1, keepdim=True)
    ops.normalize_rows(W)
    torch.testing.assert_close(W.double(), want, rtol=1e-6, atol=1e-6)


def test_by_latent_is_a_stable_sort(ops):
    g = torch.Generator().manual_seed(9)
    cols = torch.randint(0, 11, (300,), generator=g, dtype=torch.int32)
    cols[cols == 7] = 8  # latent 7 has no pairs
    rows = torch.arange(300, dtype=torch.int32)
    values = torch.randn(300, generator=g)
    offsets, (rows_s, values_s) = ops.by_latent(cols, 11, [rows, values])
    perm = torch.argsort(cols, stable=True)
    assert torch.equal(rows_s, rows[perm]) and torch.equal(values_s, values[perm])
    assert torch.equal(
        offsets.long(), torch.cat([torch.zeros(1), torch.bincount(cols, minlength=11).cumsum(0)]).long()
    )
    with pytest.raises(RuntimeError, match="latent index out of range"):
        ops.by_latent(cols, 5, [rows])


def test_candidates_stop_early_across_blocks(ops):
    """1024 columns: 64-row blocks, so the scan is split and the max_count check crosses blocks."""
    g = torch.Generator().manual_seed(10)
    xW, lo = torch.randn(300, 1024, generator=g), torch.full((1024,), 2.0)
    n = int((xW > lo).sum())
    assert ops.candidates(xW, lo, None, n)[3] == n
    rows, cols, values, found = ops.candidates(xW, lo, None, n - 1)
    assert found == -1 and rows.numel() == cols.numel() == values.numel() == 0


def test_loading_again_in_the_same_process_reuses_the_library(ops):
    """A second TORCH_LIBRARY for the namespace would abort the process: _build returns the loaded one."""
    assert kernels._build() is ops


def test_ranks_agree_on_the_path(ops, monkeypatch):
    monkeypatch.setitem(kernels._state, "ops", ops)
    assert kernels.agree_across_ranks(lambda mine: [mine, mine]) and kernels.cpu_ops() is ops
    assert not kernels.agree_across_ranks(lambda mine: [mine, False])  # one rank could not build
    assert kernels.cpu_ops() is None
