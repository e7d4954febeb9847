"""metrics.py: both FVE definitions, loss recovered, delta_loss, CE/KL and the bootstrap, checked
against numbers computed by hand (and, for the bootstrap, its defining properties)."""

import math

import pytest
import torch

from dictionary_learning import evaluation as ev
from dictionary_learning import metrics


def test_reconstruction_metrics_hand_computed():
    x = torch.tensor([[1.0, 2.0, 2.0], [3.0, 0.0, 4.0]])  # norms 3 and 5
    x_hat = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    f = torch.tensor([[0.0, 1.5, 0.0, 2.0], [0.0, 0.0, 0.0, 0.1]])
    m = metrics.reconstruction_metrics(x, x_hat, f)
    # Var over the 2 tokens per dim: x -> 1, 1, 1 (sum 3); r = x - x_hat = [[0,0,0],[3,0,4]] -> 2.25, 0, 4
    assert m["frac_variance_explained_centred"] == pytest.approx(1 - 6.25 / 3)
    # standard: Σ‖r‖² = 25; Σ‖x − mean x‖² = 2 tokens x 3 = 6
    assert m["frac_variance_explained"] == pytest.approx(1 - 25 / 6)
    assert m["mse"] == pytest.approx(12.5)  # (0 + 25) / 2
    assert m["cossim"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert m["l2_ratio"] == pytest.approx(0.5)  # (3/3 + 0/5) / 2
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0)  # E||x_hat||^2 = 4.5 = E<x, x_hat>
    assert m["l0"] == pytest.approx(1.5)
    assert m["frac_alive"] == pytest.approx(0.5)
    assert m["dead_latents"] == 2
    assert m["n_tokens"] == 2


def test_reconstruction_metrics_shrunk_reconstruction():
    x = torch.tensor([[1.0, 2.0, 2.0], [3.0, 0.0, 4.0]])
    m = metrics.reconstruction_metrics(x, x / 2, torch.ones(2, 5))
    assert m["frac_variance_explained_centred"] == pytest.approx(0.75)  # Var(x/2) = Var(x)/4
    assert m["frac_variance_explained"] == pytest.approx(1 - (9 + 25) / 4 / 6)  # the bias is not forgiven
    assert m["mse"] == pytest.approx((9 / 4 + 25 / 4) / 2)
    assert m["cossim"] == pytest.approx(1.0)
    assert m["l2_ratio"] == pytest.approx(0.5)
    assert m["relative_reconstruction_bias"] == pytest.approx(0.5)  # 4.25 / 8.5: shrinkage shows
    assert m["l0"] == 5 and m["frac_alive"] == 1.0 and m["dead_latents"] == 0


def test_stats_do_not_depend_on_how_tokens_are_split():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g) * 3 + 1
    x_hat = x + torch.randn(50, 8, generator=g)
    f = torch.relu(torch.randn(50, 16, generator=g))
    whole = metrics.reconstruction_metrics(x, x_hat, f)
    stats = metrics.ReconstructionStats(8, 16)
    for i in range(0, 50, 7):
        stats.update(x[i : i + 7], x_hat[i : i + 7], f[i : i + 7])
    parts = stats.compute()
    for k, v in whole.items():
        assert parts[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k


def test_next_token_loss_kl_and_frac_recovered_hand_computed():
    # 1 row, 4 positions, vocab 2; position 2 holds a special token (keep False)
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [5.0, -5.0], [1.0, 2.0]]])
    ids = torch.tensor([[0, 0, 1, 1]])
    keep = torch.tensor([[True, True, False, True]])
    logp, targets, rows = ev.next_token_logprobs(logits, ids, keep)
    # loss positions: t=0 (next token real) and t=2 (next token real); t=1 predicts the special token
    assert targets.tolist() == [0, 1] and rows.tolist() == [0, 0]
    torch.testing.assert_close(logp[0], torch.tensor([math.log(0.5)] * 2))
    torch.testing.assert_close(
        metrics.cross_entropy(logp, targets), torch.tensor([math.log(2), 10 + math.log1p(math.exp(-10))])
    )
    # first position excluded (exclude_first_k=1 / BOS): t=0 predicts a kept token, but no splice reaches
    # it (its output depends on position 0 alone), so it is no loss position; t=1 and t=2 are
    _, targets, rows = ev.next_token_logprobs(logits, ids, torch.tensor([[False, True, True, True]]))
    assert targets.tolist() == [1, 1] and rows.tolist() == [0, 0]
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.75, 0.25]]).log()
    # KL(p || q) = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 ln(4/3)
    torch.testing.assert_close(metrics.kl_divergence(p, q), torch.tensor([0.5 * math.log(4 / 3)]))
    assert metrics.kl_divergence(q, q).abs().max() < 1e-7
    assert metrics.frac_recovered(5.0, 2.0, 1.0) == pytest.approx(0.75)
    assert metrics.frac_recovered(5.0, 5.0, 1.0) == 0.0
    assert math.isnan(metrics.frac_recovered(1.0, 1.0, 1.0))
    # resamples (tensors): an undefined ratio is NaN, which bootstrap leaves out, never ±inf
    r = metrics.frac_recovered(
        torch.tensor([5.0, 1.0, 1.0]), torch.tensor([2.0, 2.0, 1.0]), torch.tensor([1.0] * 3)
    )
    assert r[0] == 0.75 and r[1:].isnan().all()


def test_fve_definitions_on_a_constant_bias():
    """x̂ = x + c: the centred FVE (dictionary_learning) forgives the bias, the standard one does not."""
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 4.0]])  # mean (2, 2); Σ‖x − mean‖² = 5 + 1 + 4 = 10
    c = torch.tensor([0.5, -1.0])  # ‖c‖² = 1.25, over 3 tokens 3.75
    m = metrics.reconstruction_metrics(x, x + c, torch.ones(3, 4))
    assert m["frac_variance_explained_centred"] == pytest.approx(1.0)
    assert m["frac_variance_explained"] == pytest.approx(1 - 3.75 / 10)
    assert m["mse"] == pytest.approx(1.25)


def test_delta_loss_and_loss_recovered_from_window_sums_by_hand():
    # two windows; next-token losses summed per window (nats), and the number of loss positions
    per = {
        "n": torch.tensor([3.0, 1.0], dtype=torch.float64),
        "clean": torch.tensor([6.0, 1.0], dtype=torch.float64),  # mean 7/4
        "sae": torch.tensor([7.5, 1.5], dtype=torch.float64),  # mean 9/4
        "zero": torch.tensor([30.0, 10.0], dtype=torch.float64),  # mean 10
        "mean": torch.tensor([12.0, 4.0], dtype=torch.float64),  # mean 4
        "kl": torch.tensor([0.3, 0.1], dtype=torch.float64),  # mean 0.1
    }
    point = {k: metrics.bootstrap(stat, per, None)[0] for k, stat in ev.LOSS_STATS.items()}
    assert point["delta_loss"] == pytest.approx(9 / 4 - 7 / 4)
    assert point["frac_recovered"] == pytest.approx((10 - 9 / 4) / (10 - 7 / 4))
    assert point["frac_recovered_mean"] == pytest.approx((4 - 9 / 4) / (4 - 7 / 4))
    assert point["kl_div"] == pytest.approx(0.1)


def _window_stats(n_windows, seed=0, tokens_per_window=16, d=8):
    """ReconstructionStats of a noisy reconstruction, tokens grouped in windows."""
    g = torch.Generator().manual_seed(seed)
    n = n_windows * tokens_per_window
    x = torch.randn(n, d, generator=g) * 2 + 1
    x_hat = x + torch.randn(n, d, generator=g) * (0.5 + torch.rand(n, 1, generator=g))
    stats = metrics.ReconstructionStats(d, 4, n_windows)
    stats.update(x, x_hat, torch.ones(n, 4), torch.arange(n) // tokens_per_window)
    return stats, x, x_hat


def test_bootstrap_interval_holds_the_point_and_narrows_with_more_tokens():
    widths = []
    for n_windows in (10, 40, 160, 640):
        stats, x, x_hat = _window_stats(n_windows)
        out = stats.compute(metrics.resample_weights(n_windows, 1000, seed=1))
        for key in ("frac_variance_explained", "frac_variance_explained_centred"):
            lo, hi = out[key + "_ci"]
            assert lo < out[key] < hi, (n_windows, key)
        # the point estimate is the plain formula on all tokens (independent computation)
        want = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert out["frac_variance_explained"] == pytest.approx(float(want), rel=1e-6)
        widths.append(out["frac_variance_explained_ci"][1] - out["frac_variance_explained_ci"][0])
    assert all(a > b for a, b in zip(widths, widths[1:])), widths
    assert widths[0] / widths[-1] > 4  # ~sqrt(64) = 8 for 64x the windows


def test_bootstrap_resamples_are_seeded_and_draw_every_unit_count():
    w = metrics.resample_weights(7, 50, seed=3)
    assert w.shape == (50, 7) and torch.equal(w.sum(1), torch.full((50,), 7.0, dtype=torch.float64))
    assert torch.equal(w, metrics.resample_weights(7, 50, seed=3))
    assert not torch.equal(w, metrics.resample_weights(7, 50, seed=4))
    with pytest.raises(ValueError, match="no units"):
        metrics.resample_weights(0)
