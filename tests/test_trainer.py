"""JumpReluTrainer: config, schedules, sparse == dense gradients, Adam, folding, exact resume, bad
input, and recovery of known features from synthetic superposition data."""

import copy
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from dictionary_learning import jumprelu as J
from dictionary_learning.config import TrainerConfig
from dictionary_learning.dictionary import JumpReluAutoEncoder
from dictionary_learning.trainer import JumpReluTrainer, estimate_norm_factor

# SAE_TEST_DEVICE=cuda runs these tests on a GPU (benchmarks/gpu_checks.sh does); CI is CPU-only.
DEVICE = os.environ.get("SAE_TEST_DEVICE", "cpu")

# Small-problem settings. The paper's ε = θ₀ = 0.001 and lr 7e-5 are tuned for d = 2304 and
# billions of tokens; on a d = 16-32 toy with ~4 features of size ~1 per token, θ would barely move
# in a few hundred steps, so these tests use lr 3e-3, ε = 0.1, θ₀ = 0.2.
SMALL = dict(lr=3e-3, bandwidth=0.1, threshold_init=0.2, device=DEVICE)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (badly so on a shared, busy CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def superposition(d, n_features, p_active, noise=0.01, seed=0):
    """n_features random unit directions in d dims; each token turns each feature on with
    probability p_active, magnitude U[0.5, 1.5]; plus Gaussian noise. Returns (V [N, d], sample)."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(n_features, d, generator=g)
    V /= V.norm(dim=1, keepdim=True)

    def sample(batch):
        on = torch.rand(batch, n_features, generator=g) < p_active
        codes = on * (torch.rand(batch, n_features, generator=g) + 0.5)
        return codes @ V + noise * torch.randn(batch, d, generator=g), on.sum(1).float()

    return V, sample


def pre_acts_of(ae, x):
    """The pre-activations z = x·W_enc + b_enc [B, m], written out here (the test's own formula)."""
    return x.to(ae.W_enc.dtype) @ ae.W_enc + ae.b_enc


def reference_grads(t, x, coeff, pre_acts=None):
    """The reference the step is tested against: plain autograd on dense [B, m] tensors through
    jumprelu.py's JumpReLUFunction and StepFunction (step on pre_acts, not f: bug #55), for the loss of
    trainer t ('l0' / 'target_l0' modes) on the normalised batch x. Sets .grad of every parameter and
    returns the statistics compute_grads returns. pre_acts: use these (e.g. from a bf16 product)."""
    ae = t.ae
    with torch.enable_grad():
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in t.params.items()}
        if pre_acts is None:
            pre_acts = x @ leaves["W_enc"].T + leaves["b_enc"]
        else:
            pre_acts = pre_acts.detach().requires_grad_(True)
        x_hat = J.jumprelu(pre_acts, leaves["threshold"], t.cfg.bandwidth) @ leaves["W_dec"] + leaves["b_dec"]
        mse = J.reconstruction_loss(x, x_hat)
        l0 = J.step(pre_acts, leaves["threshold"], t.cfg.bandwidth).sum(-1).mean()
        sp = t.sparsity_penalty(l0, coeff)
        (mse + sp).backward()
    for n, p in t.params.items():
        p.grad = leaves[n].grad
    counts = (pre_acts > ae.threshold).sum(0, dtype=torch.int32)
    x_hat = x_hat.detach()
    return {"loss": (mse + sp).detach(), "mse": mse.detach(), "sparsity_loss": sp.detach(), "l0": l0.detach(),
            "x_hat": x_hat, "mean_err": (x_hat - x).mean(0), "fired": counts > 0, "counts": counts}  # fmt: skip


def randomise(trainer, seed=0, quantile=0.9, window_frac=0.05):
    """Give a trainer a non-trivial state: random biases, θ at a per-latent quantile of the
    pre-activations of a batch x, and some (token, latent) pairs inside the kernel window.
    Returns x [B, d]."""
    c, ae = trainer.cfg, trainer.ae
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(96, c.activation_dim, generator=g) / c.activation_dim**0.5).to(DEVICE)
    with torch.no_grad():
        ae.b_enc.copy_(torch.randn(c.dict_size, generator=g) * 0.05)
        ae.b_dec.copy_(torch.randn(c.activation_dim, generator=g) * 0.05)
        pre = pre_acts_of(ae, x)
        ae.threshold.copy_(torch.quantile(pre, quantile, dim=0).clamp_min(0) + 1e-4)
        # nudge some latents so a token sits at θ ± ε/4 (inside the window, both sides)
        n = max(1, int(window_frac * c.dict_size))
        shift = (torch.where(torch.arange(n) % 2 == 0, 0.25, -0.25) * c.bandwidth).to(DEVICE)
        ae.threshold[:n] = pre[0, :n] - shift
        ae.threshold.clamp_(min=0)
    return x


# ---------------------------------------------------------------------------- config


def test_config_validation():
    for bad in (dict(dict_size=0), dict(dict_size=-3), dict(activation_dim=0)):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            TrainerConfig(**{"activation_dim": 8, "dict_size": 16, **bad})
    for bw in (0.0, -1e-3):
        with pytest.raises(ValueError, match="bandwidth"):
            TrainerConfig(8, 16, bandwidth=bw)
    with pytest.raises(ValueError, match="sparsity_mode"):
        TrainerConfig(8, 16, sparsity_mode="l1")
    with pytest.raises(ValueError, match="target_l0"):
        TrainerConfig(8, 16, sparsity_mode="target_l0", target_l0=None)
    with pytest.raises(ValueError, match="decay_start"):
        TrainerConfig(8, 16, decay_start=1.5)
    with pytest.raises(ValueError, match="unknown dtype"):
        TrainerConfig(8, 16, dtype="float13")
    with pytest.raises(ValueError, match="unknown field"):
        TrainerConfig.from_dict({"activation_dim": 8, "dict_size": 16, "lr_typo": 1})


def test_name_encodes_width_sparsity_lr_seed():
    assert TrainerConfig(576, 4608, target_l0=64).name == "jumprelu_w4608_tl0-64_lr7e-05_s0"
    assert TrainerConfig(576, 4608, sparsity_mode="l0", sparsity_coeff=0.5, lr=1e-4, seed=3).name == (
        "jumprelu_w4608_l0c-0.5_lr0.0001_s3"
    )


def test_config_complete_and_json_round_trip():
    t = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE, seed=5, steps=123)
    t.set_norm_factor(2.5)
    cfg = json.loads(json.dumps(t.cfg.to_dict()))
    for key in ("lr", "sparsity_mode", "sparsity_coeff", "target_l0", "bandwidth", "threshold_init", "steps",
                "warmup_steps", "sparsity_warmup_steps", "decay_start", "max_grad_norm", "adam_betas",
                "adam_eps", "seed", "dtype", "device", "unit_norm_decoder", "dead_feature_threshold"):  # fmt: skip
        assert key in cfg, key
    assert cfg["norm_factor"] == 2.5 and cfg["seed"] == 5 and cfg["name"] == t.name
    assert TrainerConfig.from_dict(cfg) == t.cfg
    assert JumpReluTrainer(cfg).cfg.to_dict() == t.cfg.to_dict()


def test_schedules():
    t = JumpReluTrainer(activation_dim=4, dict_size=8, device=DEVICE, steps=100, warmup_steps=10,
                        decay_start=0.8, sparsity_warmup_steps=20)  # fmt: skip
    # linear LR warm-up over 10 steps, constant, linear decay over the last 20% (steps 80..99)
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 50: 1.0, 80: 1.0, 90: 0.5, 99: 0.05}
    for step, f in expected.items():
        assert t.lr_factor(step) == pytest.approx(f), step
    for step, f in {0: 0.0, 5: 0.25, 20: 1.0, 500: 1.0}.items():
        assert t.sparsity_factor(step) == pytest.approx(f), step
    out = t.update(5, torch.randn(16, 4))
    assert out["lr"] == pytest.approx(7e-5 * 0.6) and out["sparsity_coeff"] == pytest.approx(0.25)


# ---------------------------------------------------------------------------- gradients, optimiser


@pytest.mark.parametrize("mode", ["l0", "target_l0"])
@pytest.mark.parametrize("quantile", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("bandwidth", [0.02, 0.5])
def test_sparse_and_dense_gradients_agree_with_autograd(mode, quantile, bandwidth):
    t = JumpReluTrainer(activation_dim=24, dict_size=80, device=DEVICE, sparsity_mode=mode, target_l0=3,
                        bandwidth=bandwidth, sparsity_coeff=0.7, seed=1)  # fmt: skip
    x = randomise(t, seed=2, quantile=quantile)
    if bandwidth == 0.5 and quantile == 0.99:  # a wide window (the demo's): most kept pairs are inactive
        ae = t.ae
        codes = J.encode(x, t.params["W_enc"], ae.b_enc, ae.threshold, bandwidth, max_density=1.0)
        assert codes.pairs.rows.numel() > 2 * codes.pairs.active.numel() > 0
    grads, stats = {}, {}
    for kind in ("autograd", "sparse", "dense"):
        if kind == "autograd":
            stats[kind] = reference_grads(t, x, coeff=0.7)
        else:
            stats[kind] = t.compute_grads(x, coeff=0.7, backward=kind)
            assert t.last_backward == kind
        grads[kind] = {n: p.grad.clone() for n, p in t.params.items()}
        stats[kind] = {k: v.clone() for k, v in stats[kind].items()}  # x_hat is reused by the next call
    assert grads["autograd"]["threshold"].abs().sum() > 0  # the window is populated
    for kind in ("sparse", "dense"):
        for n, gd in grads["autograd"].items():
            gs = grads[kind][n]
            assert gs.shape == gd.shape
            assert (gs - gd).norm() <= 1e-5 * gd.norm() + 1e-12, (kind, n)
        for k in ("loss", "mse", "sparsity_loss", "l0"):
            assert float(stats[kind][k]) == pytest.approx(float(stats["autograd"][k]), rel=1e-5), (kind, k)
        for k in ("x_hat", "mean_err"):
            torch.testing.assert_close(stats[kind][k], stats["autograd"][k], rtol=1e-5, atol=1e-6)
        assert torch.equal(stats[kind]["fired"], stats["autograd"]["fired"])
        assert torch.equal(stats[kind]["counts"], stats["autograd"]["counts"])
    assert torch.equal(stats["sparse"]["counts"].long(), (pre_acts_of(t.ae, x) > t.ae.threshold).sum(0))


def test_auto_weighs_a_window_pair_a_quarter_of_an_active_one():
    """encode's sparse branch runs while n_kept + 3·n_active <= 4·max_density·B·m (jumprelu._sparse_pairs):
    with a wide window it stays sparse where the kept pairs alone exceed max_density of the B·m."""
    t = JumpReluTrainer(activation_dim=24, dict_size=80, device=DEVICE, bandwidth=0.5, seed=1)
    x = randomise(t, seed=2, quantile=0.99)
    ae, (B, m) = t.ae, (x.shape[0], t.cfg.dict_size)

    def codes(max_density):
        return J.encode(x, t.params["W_enc"], ae.b_enc, ae.threshold, 0.5, max_density=max_density)

    pairs = codes(1.0).pairs
    n, k = pairs.rows.numel(), pairs.active.numel()
    cost = (n + 3 * k) / (4 * B * m)
    assert n / (B * m) > cost  # the kept pairs alone would have sent the old rule to the dense branch
    assert codes(cost + 0.5 / (4 * B * m)).pairs is not None
    assert codes(cost - 0.5 / (4 * B * m)).pairs is None


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_gradients_written_in_place(kind):
    """The W_dec / W_enc gradients are computed into last step's tensors (sparse: block-wise bags):
    same gradients as autograd, and the storage is reused across steps."""
    t = JumpReluTrainer(activation_dim=24, dict_size=80, device=DEVICE, backward=kind, bandwidth=0.02)
    x = randomise(t, seed=2, quantile=0.9)
    reference_grads(t, x, coeff=0.7)
    ref = {n: p.grad.clone() for n, p in t.params.items()}
    t.compute_grads(x, coeff=0.7)
    ptrs = {n: t.params[n].grad.data_ptr() for n in ("W_dec", "W_enc")}
    for n, g in ref.items():
        assert (t.params[n].grad - g).norm() <= 1e-5 * g.norm() + 1e-12, n
    t.update(0, x)
    t.update(1, x)
    assert {n: t.params[n].grad.data_ptr() for n in ("W_dec", "W_enc")} == ptrs


def test_auto_picks_dense_when_dense_and_sparse_when_sparse():
    t = JumpReluTrainer(activation_dim=16, dict_size=64, device=DEVICE)  # the device default
    x = randomise(t, quantile=0.5)
    t.compute_grads(x, 1.0)
    assert t.last_backward == "dense"
    x = randomise(t, quantile=0.99, window_frac=0.0)
    t.compute_grads(x, 1.0)
    assert t.last_backward == "sparse"


def test_optimizer_step_is_dense_adam():
    """Latents that don't fire get zero gradient: with β1 = 0 their parameters must not move while
    exp_avg_sq still decays by β2, exactly as dense torch.optim.Adam does (no lazy/sparse Adam)."""
    t = JumpReluTrainer(activation_dim=16, dict_size=32, device=DEVICE, unit_norm_decoder=False,
                        max_grad_norm=None, warmup_steps=0, lr=1e-3, backward="sparse")  # fmt: skip
    x = randomise(t, quantile=0.9, window_frac=0.0)
    t.update(0, x)  # every Adam state entry now non-zero somewhere
    with torch.no_grad():
        t.ae.threshold[:8] = 1e6  # latents 0..7 never fire now
    params0 = {n: p.detach().clone() for n, p in t.params.items()}
    v0 = t.optimizer.state[t.params["W_enc"]]["exp_avg_sq"].clone()
    t.compute_grads(x, coeff=t.cfg.sparsity_coeff * t.sparsity_factor(1))
    assert t.last_backward == "sparse"
    grads = {n: p.grad.clone() for n, p in t.params.items()}
    # params["W_enc"] is W_enc's [m, d] transpose (same storage): latent j is row j
    assert not grads["W_enc"][:8].any() and grads["W_enc"][8:].any()
    state0 = copy.deepcopy(t.optimizer.state_dict())  # (load_state_dict would share the tensors)
    fused = t.optimizer.defaults.get("fused")
    refs = {}
    for impl in ("same", "for-loop"):  # a separate dense torch.optim.Adam on copies of the params
        ref = {n: torch.nn.Parameter(p.clone()) for n, p in params0.items()}
        kw = dict(fused=fused) if impl == "same" else dict(foreach=False)
        opt = torch.optim.Adam(list(ref.values()), lr=1e-3, betas=(0.0, 0.999), eps=1e-8, **kw)
        st = copy.deepcopy(state0)
        st["param_groups"][0].update(fused=kw.get("fused"), foreach=kw.get("foreach"))
        opt.load_state_dict(st)
        for n, p in ref.items():
            p.grad = grads[n]
        opt.step()
        refs[impl] = ref
    t.update(1, x)
    for n, p in t.params.items():
        assert torch.equal(p.detach(), refs["same"][n].detach()), n  # bitwise
        torch.testing.assert_close(p.detach(), refs["for-loop"][n].detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(t.ae.W_enc[:, :8], params0["W_enc"][:8].T)  # zero-gradient latents stay put
    v1 = t.optimizer.state[t.params["W_enc"]]["exp_avg_sq"]
    torch.testing.assert_close(v1[:8], 0.999 * v0[:8], rtol=1e-6, atol=0)  # ... but their v decays
    assert v1[:8].min() > 0


def test_unit_norm_decoder_step():
    """With unit_norm_decoder the gradient's component along each W_dec row is removed before Adam
    (in place: the stored gradient ends up orthogonal to the old rows), and the rows are unit length
    after the step."""
    t = JumpReluTrainer(activation_dim=16, dict_size=32, device=DEVICE, lr=1e-2, warmup_steps=0)
    x = randomise(t, quantile=0.7)
    W0 = t.ae.W_dec.detach().clone()
    torch.testing.assert_close(W0.norm(dim=1), torch.ones(32, device=DEVICE))  # unit rows from the init
    t.update(0, x)
    g = t.params["W_dec"].grad
    assert g.abs().sum() > 0
    assert (g * W0).sum(1).abs().max() <= 1e-5 * g.norm(dim=1).max()
    torch.testing.assert_close(t.ae.W_dec.norm(dim=1), torch.ones(32, device=DEVICE))
    assert (t.ae.W_dec - W0).norm(dim=1).min() > 1e-4  # every row moved


@pytest.mark.parametrize("active", [False, True])
def test_nan_decoder_row_refuses_the_step(active):
    """A NaN W_dec row of a latent with a candidate pair never reaches the parameters: when the pair is
    active it makes the loss NaN; when it sits just below θ (f = 0, so the sparse decode skips it) it
    makes θ's gradient NaN through ∂L/∂f. Either way update refuses the step and changes nothing."""
    t = JumpReluTrainer(activation_dim=16, dict_size=32, device=DEVICE, backward="sparse", bandwidth=0.02)
    x = randomise(t, quantile=0.9, window_frac=0.0)
    with torch.no_grad():
        pre = pre_acts_of(t.ae, x)
        j = 5  # its largest pre-activation just above θ (active) or just below it (an inactive candidate)
        t.ae.threshold[j] = pre[:, j].max() + (-0.25 if active else 0.25) * t.cfg.bandwidth
        assert (pre[:, j] > t.ae.threshold[j]).any() == active
        t.ae.W_dec[j] = float("nan")
    stats = t.compute_grads(x, 1.0)
    assert math.isnan(float(stats["loss"])) == active
    assert math.isnan(float(t.params["threshold"].grad[j]))
    before = {n: p.detach().clone() for n, p in t.params.items()}
    why = "loss is nan" if active else "threshold's gradient is not finite"
    with pytest.raises(FloatingPointError, match=why):
        t.update(0, x)
    for n, p in t.params.items():  # unchanged, W_dec's NaN row included
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0, equal_nan=True, msg=n)


def test_threshold_never_negative():
    # no sparsity pressure, big lr: the reconstruction term pushes θ down into the clamp
    t = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE, sparsity_coeff=0.0, lr=0.05,
                        bandwidth=0.2, threshold_init=0.01, warmup_steps=0)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    hit_zero = False
    for s in range(30):
        t.update(s, torch.randn(32, 8, generator=g))
        assert t.ae.threshold.min() >= 0
        hit_zero |= bool((t.ae.threshold == 0).any())
    assert hit_zero  # the clamp was needed


def test_same_seed_same_weights():
    a = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE, seed=7)
    b = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE, seed=7)
    c = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE, seed=8)
    torch.manual_seed(123)  # the global RNG must not matter
    d = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE, seed=7)
    for n in a.params:
        assert torch.equal(a.params[n], b.params[n]) and torch.equal(a.params[n], d.params[n])
    assert not torch.equal(a.ae.W_dec, c.ae.W_dec)


# ---------------------------------------------------------------------------- sparsity control


def _train_l0(steps=400, **kw):
    _, sample = superposition(16, 32, 4 / 32)
    t = JumpReluTrainer(activation_dim=16, dict_size=32, steps=steps, warmup_steps=20,
                        sparsity_warmup_steps=100, **SMALL, **kw)  # fmt: skip
    t.set_norm_factor(estimate_norm_factor([sample(1024)[0]]))
    l0 = []
    for s in range(steps):
        l0.append(t.update(s, sample(128)[0])["l0"])
    return sum(l0[-50:]) / 50


def test_l0_falls_as_coefficient_rises():
    l0 = [_train_l0(sparsity_mode="l0", sparsity_coeff=c) for c in (0.003, 0.03, 0.3)]
    assert l0[0] > l0[1] > l0[2], l0


@pytest.mark.parametrize("target", [2, 8])
def test_target_l0_tracked(target):
    l0 = _train_l0(sparsity_mode="target_l0", target_l0=target, sparsity_coeff=1.0)
    assert abs(l0 - target) <= 0.3 * target, l0


def test_recovers_ground_truth_features():
    """64 directions in 32 dims, ~4 active per token. Mean over true directions of the best cosine
    with a decoder row >= 0.9, and L0 within ±30% of the true active count."""
    V, sample = superposition(32, 64, 4 / 64)
    steps = 3000
    t = JumpReluTrainer(activation_dim=32, dict_size=128, sparsity_mode="l0", sparsity_coeff=0.03,
                        steps=steps, warmup_steps=150, sparsity_warmup_steps=600, **SMALL)  # fmt: skip
    t.set_norm_factor(estimate_norm_factor([sample(1024)[0] for _ in range(4)]))
    for s in range(steps):
        t.update(s, sample(256)[0])
    W = t.ae.W_dec.detach().cpu()
    mmcs = (V @ (W / W.norm(dim=1, keepdim=True)).T).max(1).values
    assert mmcs.mean() >= 0.9, mmcs
    x, n_true = sample(4096)
    l0 = (t.folded_ae().encode(x.to(DEVICE)) > 0).float().sum(1).mean().cpu()
    assert abs(l0 - n_true.mean()) <= 0.3 * n_true.mean(), (float(l0), float(n_true.mean()))


# ---------------------------------------------------------------------------- loss options


def option_reference(t, x, coeff, dead):
    """Plain autograd on dense tensors through jumprelu.py's JumpReLUFunction (and StepFunction for
    L0 modes), with the two options' formulas written out here: tanh penalty (1/B)·Σ tanh(c·f·‖W_dec_j‖),
    pre-activation loss (1/B)·Σ_{dead j} ReLU(θ_j − z)·‖W_dec_j‖. Returns {name: gradient}."""
    c = t.cfg
    P = {n: p.detach().clone().requires_grad_(True) for n, p in t.params.items()}
    pre_acts = x @ P["W_enc"].T + P["b_enc"]
    f = J.jumprelu(pre_acts, P["threshold"], c.bandwidth)
    norms = P["W_dec"].norm(dim=1)
    loss = ((x - (f @ P["W_dec"] + P["b_dec"])) ** 2).sum(1).mean()
    if c.sparsity_mode == "tanh":
        loss = loss + coeff * torch.tanh(c.tanh_scale * f * norms).sum(1).mean()
    else:
        loss = loss + t.sparsity_penalty(J.step(pre_acts, P["threshold"], c.bandwidth).sum(1).mean(), coeff)
    if c.pre_act_loss_coeff:
        loss = (
            loss + c.pre_act_loss_coeff * ((P["threshold"] - pre_acts).relu() * norms)[:, dead].sum(1).mean()
        )
    loss.backward()
    return {n: p.grad for n, p in P.items()}


@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize(
    "option,bandwidth", [("tanh", 0.02), ("pre_act", 0.02), ("both", 0.02), ("tanh", 0.5)]
)
def test_loss_options_agree_with_autograd(option, kind, bandwidth):
    """tanh at a wide window: ∂L/∂f is not 0 at the inactive pairs there (tanh'(0) ≠ 0), and reaches θ."""
    kw = dict(sparsity_mode="tanh", tanh_scale=3.0) if option in ("tanh", "both") else {}
    if option in ("pre_act", "both"):
        kw["pre_act_loss_coeff"] = 0.3
    t = JumpReluTrainer(activation_dim=24, dict_size=80, device=DEVICE, bandwidth=bandwidth, sparsity_coeff=0.7,
                        seed=1, dead_feature_threshold=50, **kw)  # fmt: skip
    x = randomise(t, seed=2, quantile=0.9)
    dead = torch.arange(3, 80, 7, device=DEVICE)  # latents 3, 10, ...: silent for 60 tokens > 50
    t.tokens_since_fired[dead] = 60
    assert torch.equal(t.dead_latents(), dead)
    ref = option_reference(t, x, 0.7, dead)
    s = t.compute_grads(x, coeff=0.7, backward=kind)
    assert t.last_backward == kind and ("pre_act_loss" in s) == (option != "tanh")
    for n, g in ref.items():
        assert g.abs().sum() > 0, n
        assert (t.params[n].grad - g).norm() <= 1e-5 * g.norm(), (option, kind, n)


def test_tanh_penalty_trains_sparser_with_a_larger_coefficient():
    l0 = [_train_l0(sparsity_mode="tanh", sparsity_coeff=c) for c in (0.003, 0.03, 0.3)]
    assert l0[0] > l0[1] > l0[2], l0


def test_pre_act_loss_revives_dead_latents():
    """Latents whose b_enc is far below θ never fire, so no gradient reaches them; the pre-activation
    loss pushes their z up until they fire again. Without it they stay dead."""
    _, sample = superposition(16, 32, 4 / 32)
    fired = {}
    for coeff in (None, 0.05):
        t = JumpReluTrainer(activation_dim=16, dict_size=32, steps=300, warmup_steps=20, sparsity_warmup_steps=100,
                            sparsity_mode="l0", sparsity_coeff=0.03, dead_feature_threshold=256,
                            pre_act_loss_coeff=coeff, **SMALL)  # fmt: skip
        t.set_norm_factor(estimate_norm_factor([sample(1024)[0]]))
        with torch.no_grad():
            t.ae.b_enc[:8] = -3.0  # latents 0..7: z far below θ on every token
        counts = torch.zeros(32, dtype=torch.int64, device=DEVICE)
        for s in range(300):
            out = t.update(s, sample(128)[0])
            if s >= 250:
                counts += t.fire_counts
            t.firing_density()  # a new window every step
        fired[coeff] = int((counts[:8] > 0).sum())
        assert math.isfinite(out["loss"]) and ("pre_act_loss" in out) == (coeff is not None)
    assert fired[None] == 0 and fired[0.05] >= 6, fired


# ---------------------------------------------------------------------------- normalisation


def test_estimate_norm_factor():
    x = torch.randn(50, 6)
    x = 2.0 * x / x.norm(dim=1, keepdim=True)  # every row has norm 2
    assert estimate_norm_factor([x[:20], x[20:]]) == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(ValueError, match="no batches"):
        estimate_norm_factor([])
    with pytest.raises(ValueError, match="batch 1 contains NaN"):
        estimate_norm_factor([x, torch.full((2, 6), float("nan"))])
    with pytest.raises(ValueError, match="finite number > 0"):
        JumpReluTrainer(activation_dim=6, dict_size=8, device=DEVICE).set_norm_factor(0.0)


def test_update_divides_by_norm_factor():
    a = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE, backward="dense")
    b = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE, backward="dense")
    b.set_norm_factor(4.0)
    x = torch.randn(32, 8)
    assert a.update(0, x)["mse"] == pytest.approx(b.update(0, 4.0 * x)["mse"], rel=1e-5)


def test_folded_sae_takes_raw_activations(tmp_path):
    f = 3.7
    t = JumpReluTrainer(activation_dim=12, dict_size=40, device=DEVICE, norm_factor=f)
    randomise(t, quantile=0.8)
    x = (torch.randn(64, 12) * f).to(DEVICE)
    folded = t.folded_ae()
    assert torch.equal(folded.W_enc, t.ae.W_enc) and torch.equal(folded.W_dec, t.ae.W_dec)
    f_norm = t.ae.encode(x / f)
    assert torch.equal(folded.encode(x) > 0, f_norm > 0)
    torch.testing.assert_close(folded.encode(x), f * f_norm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded(x), f * t.ae(x / f), rtol=1e-5, atol=1e-5)
    live = {n: p.detach().clone() for n, p in t.params.items()}
    t.save(tmp_path, {"model_name": "toy"})
    loaded = JumpReluAutoEncoder.from_pretrained(tmp_path, device=DEVICE)
    assert torch.equal(loaded(x), folded(x))
    assert loaded.cfg["norm_factor"] == f and loaded.cfg["norm_factor_folded"] is True
    assert loaded.cfg["model_name"] == "toy"
    for n, p in t.params.items():  # the live (normalised) SAE is untouched
        assert torch.equal(p, live[n]), n


# ---------------------------------------------------------------------------- state, resume


def _batches(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(48, d, generator=g) * 2.0 for _ in range(n)]


@pytest.mark.parametrize("backward", ["auto", "dense"])
def test_exact_resume(tmp_path, backward):
    kw = dict(activation_dim=10, dict_size=24, steps=40, warmup_steps=5, sparsity_warmup_steps=10,
              dead_feature_threshold=100, backward=backward, sparse_max_density=0.2, **SMALL)  # fmt: skip
    batches = _batches(40, 10, seed=0)
    full = JumpReluTrainer(**kw)
    full.set_norm_factor(estimate_norm_factor(batches[:4]))
    used = []
    for s, x in enumerate(batches):
        full.update(s, x)
        used.append(full.last_backward)
    assert set(used) == ({"dense", "sparse"} if backward == "auto" else {"dense"})  # crosses over
    part = JumpReluTrainer(**kw)
    part.set_norm_factor(estimate_norm_factor(batches[:4]))
    for s, x in enumerate(batches[:17]):
        part.update(s, x)
    state = part.state_dict()
    tensors, meta = state["tensors"], state["meta"]
    assert tensors["ae.W_enc"].shape == tensors["optim.W_enc.exp_avg_sq"].shape == (10, 24)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(meta))
    resumed = JumpReluTrainer(**kw)  # no norm factor yet: comes from the state
    resumed.load_state_dict({"tensors": load_file(str(tmp_path / "state.safetensors")),
                             "meta": json.loads((tmp_path / "state.json").read_text())})  # fmt: skip
    assert resumed.step == 17 and resumed.cfg.norm_factor == part.cfg.norm_factor
    for s, x in enumerate(batches[17:], start=17):
        resumed.update(s, x)
    for n in full.params:
        assert torch.equal(full.params[n], resumed.params[n]), n
        for k, v in full.optimizer.state[full.params[n]].items():
            assert torch.equal(v, resumed.optimizer.state[resumed.params[n]][k]), (n, k)
    assert torch.equal(full.tokens_since_fired, resumed.tokens_since_fired)
    assert full.tokens_seen == resumed.tokens_seen and full.step == resumed.step == 40


def test_load_state_rejects_other_config():
    a = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE, lr=1e-3)
    b = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE, lr=2e-3)
    with pytest.raises(ValueError, match="lr"):
        b.load_state_dict(a.state_dict())
    c = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE, lr=1e-3, autocast="bfloat16")
    with pytest.raises(ValueError, match="autocast"):
        c.load_state_dict(a.state_dict())  # bf16 products: other math


def test_load_state_accepts_other_speed_settings():
    """backward and sparse_max_density change the summation order, not the recipe: a run started with
    one resumes with another (e.g. a state saved before sparse_max_density defaulted to None)."""
    a = JumpReluTrainer(
        activation_dim=8, dict_size=16, device=DEVICE, backward="dense", sparse_max_density=0.1
    )
    a.update(0, torch.randn(32, 8))
    b = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE)
    b.load_state_dict(a.state_dict())
    for n, p in a.params.items():
        assert torch.equal(p, b.params[n]), n
    assert b.cfg.backward == "auto" and b.cfg.sparse_max_density is None and b.step == 1


def test_firing_density_is_over_the_tokens_since_the_last_read():
    """firing_density(): per latent, the fraction of the tokens trained on since the last call on which
    it fired (each step's forward, before that step's update), then a new window."""
    t = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE, norm_factor=2.0, threshold_init=0.05)
    g = torch.Generator().manual_seed(3)
    xs = [(torch.randn(24, 8, generator=g) * 2.0).to(DEVICE) for _ in range(5)]
    want = torch.zeros(16, dtype=torch.int64, device=DEVICE)
    for s, x in enumerate(xs):
        if s == 2:
            assert torch.equal(t.firing_density(), want.double() / 48)  # steps 0-1
            want.zero_()
        with torch.no_grad():
            want += (pre_acts_of(t.ae, x / 2.0) > t.ae.threshold).sum(0)  # the weights this step sees
        t.update(s, x)
    density = t.firing_density()
    assert torch.equal(density, want.double() / 72) and 0 < density.max() <= 1  # steps 2-4
    assert not t.firing_density().any()  # an empty window


def test_dead_latent_counters():
    t = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE, dead_feature_threshold=100,
                        lr=1e-6, warmup_steps=0)  # fmt: skip
    with torch.no_grad():
        t.ae.threshold[:4] = 1e6  # latents 0..3 can never fire
        t.ae.threshold[4:] = 0.0
    x = torch.randn(40, 8)
    out = [t.update(s, x) for s in range(3)]
    assert t.tokens_since_fired[:4].tolist() == [120] * 4
    assert out[1]["frac_dead"] == 0.0 and out[2]["frac_dead"] == pytest.approx(4 / 16)


# ---------------------------------------------------------------------------- bad input, dtypes


def test_bad_inputs_named():
    t = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE)
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="step 3: input batch contains NaN"):
        t.update(3, x)
    with pytest.raises(ValueError, match=r"step 0: x has shape \(4, 7\), expected \[batch, 8\]"):
        t.update(0, torch.randn(4, 7))
    before = {n: p.detach().clone() for n, p in t.params.items()}
    with pytest.raises(FloatingPointError, match="step 5: loss is inf"):
        t.update(5, torch.full((4, 8), 1e30))  # finite input, squares overflow
    for n, p in t.params.items():
        assert torch.equal(p, before[n]), n  # no update applied
    assert t.step == 0


def test_update_returns_floats():
    out = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE).update(0, torch.randn(4, 2, 8))
    keys = {
        "loss",
        "mse",
        "sparsity_loss",
        "l0",
        "frac_variance_explained",
        "frac_variance_explained_centred",
        "lr",
        "sparsity_coeff",
        "frac_dead",
    }
    assert set(out) == keys and all(isinstance(v, float) and math.isfinite(v) for v in out.values())


def test_frac_variance_explained_definition():
    t = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE)
    x = randomise(t, quantile=0.5)
    x_hat = t.ae(x).detach()  # the stats describe the weights before the step
    centred = 1 - (x - x_hat).var(0, unbiased=False).sum() / x.var(0, unbiased=False).sum()
    standard = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()  # SAELens / SAEBench
    mse = (x - x_hat).pow(2).sum(1).mean()
    out = t.update(0, x)
    assert out["frac_variance_explained"] == pytest.approx(float(standard), rel=1e-4, abs=1e-6)
    assert out["frac_variance_explained_centred"] == pytest.approx(float(centred), rel=1e-4, abs=1e-6)
    assert out["frac_variance_explained_centred"] >= out["frac_variance_explained"]
    assert out["mse"] == pytest.approx(float(mse), rel=1e-5)


def test_bf16_runs_dense_with_fp32_threshold():
    t = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE, dtype="bfloat16")
    for s in range(3):
        out = t.update(s, torch.randn(16, 8))
    assert t.last_backward == "dense" and math.isfinite(out["loss"])
    assert t.ae.W_enc.dtype == torch.bfloat16 and t.ae.threshold.dtype == torch.float32


@pytest.mark.parametrize("k,expect", [(8, "dense"), (14, "sparse")])
def test_autocast_bf16_close_to_fp32_with_fp32_state(k, expect):
    """autocast='bfloat16': GEMMs in bf16 (the dense branch's products too),
    parameters, gradients and Adam state fp32; gradients within bf16 rounding of the fp32 ones, and
    not bitwise equal to them (the bf16 products really ran). θ_j sits mid-way between the k-th and
    (k+1)-th of 16 tokens' pre-activations (latents where those are too close are switched off), so
    bf16 rounding flips no pair across θ."""
    kw = dict(
        activation_dim=64, dict_size=256, device=DEVICE, bandwidth=0.001, seed=1, sparse_max_density=0.2
    )
    ref, t = JumpReluTrainer(**kw), JumpReluTrainer(**kw, autocast="bf16")
    assert t.cfg.autocast == "bfloat16"
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(16, 64, generator=g) / 8).to(DEVICE)
    with torch.no_grad():
        for tr in (ref, t):
            tr.ae.b_enc.fill_(1.0)  # all z > 0, so no θ is clamped to 0
        z = pre_acts_of(ref.ae, x)
        err = ((x.bfloat16() @ ref.ae.W_enc.bfloat16()).float() + ref.ae.b_enc - z).abs().max()
        zs = z.sort(0).values
        theta = (zs[k - 1] + zs[k]) / 2
        theta[zs[k] - zs[k - 1] < 4 * err] = zs[-1][zs[k] - zs[k - 1] < 4 * err] + 1  # too close: off
        for tr in (ref, t):
            tr.ae.threshold.copy_(theta)
    assert (z - theta).abs().min() > 2 * err  # no pair can flip across θ
    assert (theta <= zs[-1]).float().mean() > 0.5  # most latents are live
    reference_grads(ref, x, coeff=0.7)
    t.compute_grads(x, coeff=0.7)
    assert t.last_backward == expect
    for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
        g, g_ref = t.params[n].grad, ref.params[n].grad
        assert g.dtype == torch.float32 and t.params[n].dtype == torch.float32, n
        assert (g - g_ref).norm() <= (0.02 if expect == "dense" else 1e-5) * g_ref.norm(), n
        assert expect == "sparse" or not torch.equal(g, g_ref), n
    out = t.update(0, x)
    assert (
        math.isfinite(out["loss"])
        and t.optimizer.state[t.params["W_dec"]]["exp_avg_sq"].dtype == torch.float32
    )


def test_autocast_sparse_phase_gives_the_fp32_gradients():
    """In the sparse phase under bf16 autocast the candidates are found on the bf16 product with the
    error bound as extra slack, and their pre-activations recomputed in fp32: every gradient, θ's
    included, is the fp32 one, although here bf16 rounding alone would move pairs across θ and in and
    out of the kernel window."""
    kw = dict(activation_dim=48, dict_size=160, device=DEVICE, bandwidth=0.02, seed=4, sparse_max_density=0.2)
    ref, t = JumpReluTrainer(**kw), JumpReluTrainer(**kw, autocast="bfloat16")
    x = randomise(ref, seed=5, quantile=0.97, window_frac=0.1)
    randomise(t, seed=5, quantile=0.97, window_frac=0.1)
    with torch.no_grad():
        z, th = pre_acts_of(ref.ae, x), ref.ae.threshold
        z16 = (x.bfloat16() @ ref.ae.W_enc.bfloat16()).float() + ref.ae.b_enc
        in_window = lambda v: (v - th).abs() < kw["bandwidth"] / 2  # noqa: E731
    assert ((z16 > th) != (z > th)).any() or (in_window(z16) != in_window(z)).any()  # rounding matters
    reference_grads(ref, x, coeff=0.7)
    stats = t.compute_grads(x, coeff=0.7)
    assert t.last_backward == "sparse"
    assert ref.params["threshold"].grad.abs().sum() > 0
    for n, p in t.params.items():
        g_ref = ref.params[n].grad
        assert (p.grad - g_ref).norm() <= 1e-5 * g_ref.norm() + 1e-12, n
    assert float(stats["l0"]) == pytest.approx(float((z > th).float().sum(1).mean()), rel=1e-6)


def test_autocast_dense_phase_recomputes_the_pairs_near_threshold():
    """Dense phase under bf16 autocast: z is recomputed in fp32 wherever rounding could move a pair
    across θ or the kernel window (jumprelu.JumpReLUEncoder), so θ's gradient matches fp32 closely;
    the plain autocast step on the raw bf16 product (the control) misses it by a third."""
    kw = dict(
        activation_dim=256, dict_size=1024, device=DEVICE, bandwidth=0.001, seed=0, sparse_max_density=0.05
    )
    ref, t = JumpReluTrainer(**kw), JumpReluTrainer(**kw, autocast="bfloat16")
    x = randomise(ref, seed=10, quantile=0.5, window_frac=0.1)
    randomise(t, seed=10, quantile=0.5, window_frac=0.1)
    reference_grads(ref, x, coeff=0.7)
    t.compute_grads(x, coeff=0.7)
    assert t.last_backward == "dense"

    def rel(g, n):
        return float((g.float() - ref.params[n].grad).norm() / ref.params[n].grad.norm())

    assert rel(t.params["threshold"].grad, "threshold") < 0.01
    for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert rel(t.params[n].grad, n) < 0.02, n
    ae = t.ae
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        raw = (x.bfloat16() @ ae.W_enc.bfloat16()).float() + ae.b_enc
        reference_grads(t, x, 0.7, pre_acts=raw)
    assert rel(t.params["threshold"].grad, "threshold") > 0.1


def test_autocast_config_errors():
    for bad in ("float32", "float16", "bf17"):  # fp16 needs loss scaling, which this trainer lacks
        with pytest.raises(ValueError, match=r"TrainerConfig.autocast: must be 'bfloat16' or None"):
            TrainerConfig(8, 16, autocast=bad)
    with pytest.raises(ValueError, match="backward"):
        TrainerConfig(8, 16, autocast="bfloat16", backward="autograd")  # the reference is test code now
    t = JumpReluTrainer(activation_dim=8, dict_size=16, device=DEVICE, autocast="bfloat16")
    with pytest.raises(ValueError, match="backward must be one of"):
        t.compute_grads(torch.randn(4, 8, device=DEVICE), 1.0, backward="autograd")
    t.compute_grads(torch.randn(4, 8, device=DEVICE), 1.0, backward="dense")  # one encoder: bf16 dense too
    assert t.last_backward == "dense"
