"""Benchmark one JumpReluTrainer.update at L0 ~ 64 against a dense GEMM floor and a dense step.

    python benchmarks/bench_train.py --json            # prints ONE JSON object
    python benchmarks/bench_train.py --crossover --configs 576,4608,1024   # where 'auto' should switch
    python benchmarks/bench_train.py --json --device cuda --autocast bfloat16  # on a GPU

For each config (d, m, batch), fp32 on CPU, each measurement in a fresh subprocess run with
OMP_WAIT_POLICY=PASSIVE (timings with OpenMP's default spinning wait policy are reported as well):
  step_ms        median time of trainer.update (sparse backward once L0 is low)
  floor_ms       one dense [B, d] @ [d, m] GEMM, timed in the same process, interleaved with the steps
  step_over_floor  step_ms / floor_ms (medians); step_over_floor_paired is the median over repetitions
                 of step / floor timed back to back, which a change of machine load half-way through
                 the run (the medians then come from different regimes) does not skew
  dense_ms       the same update with backward="dense" (the encoder's dense branch: [B, m] tensors and
                 GEMMs, what every step would cost without the sparse branch), same process
  peak_rss_mb    peak RSS during updates in a fresh process that only builds the trainer and trains
                 (set-up garbage is trimmed and VmHWM reset first); baseline_rss_mb is the RSS before
                 the trainer exists (interpreter, torch and its optimiser modules, the input batch);
                 net = peak − baseline is
                 compared with the minimum = params + grads + Adam state (2 × params) + one [B, m] fp32;
                 measured with default malloc settings, with MALLOC_MMAP_THRESHOLD_=262144, and with that
                 and MKL_DISABLE_FAST_MM=1 (MKL then frees its GEMM buffers after each call).
On a GPU (--device cuda) times are taken between torch.cuda.synchronize() calls, and memory is
torch.cuda.max_memory_allocated() above what was allocated before the trainer (the input batch), against
the same minimum. With --autocast the floor GEMM runs in that dtype, and so do the dense branch's GEMMs.
The threshold of each latent is set to a quantile of its pre-activations on a sample batch so that
L0 ~ 64 before timing (the init has W_enc = W_decᵀ, so a random init is otherwise dense).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

CONFIGS = [(576, 4608, 4096), (2304, 16384, 1024)]
TARGET_L0 = 64


def _rss_mb(field: str) -> float:
    """VmRSS (current) or VmHWM (peak) of this process in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


DEVICE, AUTOCAST = "cpu", None  # set from the command line in each worker


def _sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _quantile(pre: torch.Tensor, q: float) -> torch.Tensor:
    """Per-column q-quantile of pre [n, m] (nearest rank; torch.quantile refuses > 16M elements)."""
    k = min(pre.shape[0], max(1, round(q * pre.shape[0])))
    return pre.kthvalue(k, dim=0).values


def _batch(B: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Generator]:
    """_make's input batch [B, d] (E‖x‖² = 1, on the CPU) and its generator, advanced past it."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d, generator=g) / d**0.5, g


def _make(d: int, m: int, B: int, backward: str, seed: int = 0, x: torch.Tensor | None = None):
    """(trainer with L0 ~ 64, input batch x [B, d]); pass x = _batch(B, d, seed)[0] to reuse it."""
    from dictionary_learning.trainer import JumpReluTrainer

    drawn, g = _batch(B, d, seed)
    x = drawn.to(DEVICE) if x is None else x
    del drawn
    trainer = JumpReluTrainer(
        activation_dim=d, dict_size=m, device=DEVICE, dtype="float32", steps=1_000_000, autocast=AUTOCAST,
        warmup_steps=0, sparsity_warmup_steps=0, target_l0=TARGET_L0, backward=backward, seed=seed,
    )  # fmt: skip
    with torch.no_grad():  # L0 ~ 64: θ_j = the (1 − 64/m) quantile of latent j on a sample batch
        sample = (torch.randn(min(B, 1024), d, generator=g) / d**0.5).to(DEVICE)
        pre = sample @ trainer.ae.W_enc + trainer.ae.b_enc
        trainer.ae.threshold.copy_(_quantile(pre, 1 - TARGET_L0 / m).clamp_min(0))
        del pre
    return trainer, x


def _median_ms(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def worker_timing(d: int, m: int, B: int, reps: int) -> dict:
    trainer, x = _make(d, m, B, "auto")
    out = torch.empty(B, m, device=DEVICE)
    W = trainer.ae.W_enc.detach()
    if AUTOCAST:  # the floor is the GEMM in the autocast dtype
        ad = getattr(torch, AUTOCAST)
        out, W, x_floor = out.to(ad), W.to(ad), x.to(ad)
    else:
        x_floor = x
    step = [0]

    def update():
        r = trainer.update(step[0], x)
        step[0] += 1
        return r

    for _ in range(2):  # warm-up
        update()
        torch.mm(x_floor, W, out=out)
    step_ts, floor_ts = [], []
    for _ in range(reps):  # interleaved so both see the same machine load
        floor_ts.append(_median_ms(lambda: torch.mm(x_floor, W, out=out), 1))
        step_ts.append(_median_ms(update, 1))
    stats = update()
    backward = trainer.last_backward
    trainer = out = W = x_floor = None  # free them before the dense runs
    dense, x = _make(d, m, B, "dense")
    dense.update(0, x)
    dense_ms = _median_ms(lambda t=dense, x=x: t.update(1, x), max(3, reps // 2))
    dense = None
    step_ms, floor_ms = statistics.median(step_ts), statistics.median(floor_ts)
    return {
        "step_ms": round(step_ms, 3),
        "floor_ms": round(floor_ms, 3),
        "dense_ms": round(dense_ms, 3),
        "tokens_per_s": round(B / step_ms * 1e3),
        "step_over_floor": round(step_ms / floor_ms, 3),
        "step_over_floor_paired": round(statistics.median(s / f for s, f in zip(step_ts, floor_ts)), 3),
        "dense_over_step": round(dense_ms / step_ms, 3),
        "l0": round(stats["l0"], 2),
        "backward": backward,
        "step_ms_all": [round(t, 3) for t in step_ts],
        "floor_ms_all": [round(t, 3) for t in floor_ts],
    }


DENSITIES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4)


def worker_crossover(d: int, m: int, B: int, reps: int) -> dict:
    """compute_grads time of the sparse and the dense path at several densities (fraction of the B·m
    pairs active, θ set per latent to a quantile of its pre-activations on this batch), and the
    density where they cross (linear interpolation): where 'auto' should switch."""
    trainer, x = _make(d, m, B, "auto")
    ae = trainer.ae
    with torch.no_grad():
        pre = x @ ae.W_enc + ae.b_enc
    rows = []
    for rho in DENSITIES:
        with torch.no_grad():
            ae.threshold.copy_(_quantile(pre, 1 - rho).clamp_min(0))
        t = {}
        for kind in ("sparse", "dense"):
            trainer.compute_grads(x, 1.0, backward=kind)  # warm-up
            t[kind] = _median_ms(
                lambda kind=kind: trainer.compute_grads(x, 1.0, backward=kind), max(3, reps // 3)
            )
        rows.append({"density": rho, "sparse_ms": round(t["sparse"], 3), "dense_ms": round(t["dense"], 3)})
    cross = None
    for a, b in zip(rows, rows[1:]):
        da, db = a["sparse_ms"] - a["dense_ms"], b["sparse_ms"] - b["dense_ms"]
        if da <= 0 < db:
            cross = round(a["density"] + (b["density"] - a["density"]) * -da / (db - da), 3)
            break
    if cross is None and rows[-1]["sparse_ms"] <= rows[-1]["dense_ms"]:
        cross = f">{DENSITIES[-1]}"
    return {"crossover_density": cross, "by_density": rows}


def _trim_and_reset_peak() -> None:
    """Return freed heap to the OS (glibc malloc_trim) and reset VmHWM (Linux clear_refs 5), so the
    peak that follows is the training loop's, not the set-up's (init, threshold calibration)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _against_minimum(trainer, B: int, m: int, net_mb: float) -> dict:
    """The minimum (params + grads + exp_avg + exp_avg_sq, and one [B, m] fp32) and net / minimum."""
    n_params = sum(p.numel() for p in trainer.params.values())
    minimum = (4 * n_params + B * m) * 4 / 2**20
    return {"min_mb": round(minimum, 1), "net_over_min": round(net_mb / minimum, 3)}


def worker_rss(d: int, m: int, B: int, steps: int) -> dict:
    # Baseline: interpreter, torch, the optimiser machinery (the first torch.optim.Adam imports
    # ~70 MB of modules) and an input batch, which exists before the trainer in real use.
    p = torch.nn.Parameter(torch.zeros(8))
    p.grad = torch.ones(8)
    torch.optim.Adam([p], fused=True).step()
    x = _batch(B, d)[0]
    base = _rss_mb("VmRSS")
    trainer, x = _make(d, m, B, "auto", x=x)
    setup_peak = _rss_mb("VmHWM")
    _trim_and_reset_peak()
    after_setup = _rss_mb("VmRSS")
    for s in range(steps):
        trainer.update(s, x)
    peak = _rss_mb("VmHWM")
    return {
        "peak_rss_mb": round(peak, 1),
        "baseline_rss_mb": round(base, 1),
        "net_peak_rss_mb": round(peak - base, 1),
        **_against_minimum(trainer, B, m, peak - base),
        "setup_peak_rss_mb": round(setup_peak, 1),
        "rss_after_setup_mb": round(after_setup, 1),
        "backward_rss_run": trainer.last_backward,
    }


def worker_cuda_mem(d: int, m: int, B: int, steps: int) -> dict:
    """Peak GPU memory of the training loop above what exists before the trainer (the input batch)."""
    x = _batch(B, d)[0].to(DEVICE)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 2**20  # the input batch
    trainer, x = _make(d, m, B, "auto", x=x)
    trainer.update(0, x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for s in range(1, steps):
        trainer.update(s, x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20
    return {
        "cuda_peak_allocated_mb": round(peak, 1),
        "cuda_baseline_mb": round(base, 1),
        "net_peak_mb": round(peak - base, 1),
        **_against_minimum(trainer, B, m, peak - base),
        "backward_mem_run": trainer.last_backward,
    }


def run_worker(kind: str, d: int, m: int, B: int, args, env_extra: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--shape", f"{d},{m},{B}",
           "--reps", str(args.reps), "--threads", str(args.threads), "--device", args.device]  # fmt: skip
    if args.autocast:
        cmd += ["--autocast", args.autocast]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object (default: also JSON)")
    ap.add_argument("--reps", type=int, default=9, help="timed repetitions per config (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--configs", default=";".join(f"{d},{m},{b}" for d, m, b in CONFIGS),
                    help="'d,m,batch;d,m,batch'")  # fmt: skip
    ap.add_argument("--crossover", action="store_true",
                    help="instead: sparse vs dense compute_grads time by density, and the crossover")  # fmt: skip
    ap.add_argument("--device", default="cpu", help="cpu (the targets) or cuda")
    ap.add_argument("--autocast", default=None, help="matmul dtype, e.g. bfloat16 (TrainerConfig.autocast)")
    ap.add_argument("--worker", choices=["timing", "rss", "crossover", "cuda_mem"], help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    global DEVICE, AUTOCAST
    DEVICE = args.device
    AUTOCAST = (
        None
        if args.autocast is None
        else {"bf16": "bfloat16", "fp16": "float16"}.get(args.autocast, args.autocast)
    )
    cuda = DEVICE.startswith("cuda")
    if args.worker:
        d, m, B = (int(v) for v in args.shape.split(","))
        if args.worker == "timing":
            out = worker_timing(d, m, B, args.reps)
        elif args.worker == "rss":
            out = worker_rss(d, m, B, 4)
        elif args.worker == "cuda_mem":
            out = worker_cuda_mem(d, m, B, 4)
        else:
            out = worker_crossover(d, m, B, args.reps)
        print(json.dumps(out))
        return
    if args.crossover:
        res = {}
        for spec in args.configs.split(";"):
            d, m, B = (int(v) for v in spec.split(","))
            res[f"d{d}_m{m}_b{B}"] = run_worker("crossover", d, m, B, args, {"OMP_WAIT_POLICY": "PASSIVE"})
        meta = {"threads": args.threads, "torch": torch.__version__, "device": DEVICE, "autocast": AUTOCAST}
        print(json.dumps({"crossover": res, "meta": meta}))
        return
    results = {}
    passive = {"OMP_WAIT_POLICY": "PASSIVE"}
    for spec in args.configs.split(";"):
        d, m, B = (int(v) for v in spec.split(","))
        res = {"d": d, "m": m, "batch": B, "dtype": "float32", "autocast": AUTOCAST, "device": DEVICE}
        if cuda:
            res.update(run_worker("timing", d, m, B, args))
            res.update(run_worker("cuda_mem", d, m, B, args))
            results[f"d{d}_m{m}_b{B}"] = res
            continue
        res["env"] = passive
        res.update(run_worker("timing", d, m, B, args, passive))
        # The same with OpenMP's default (spinning) wait policy: on a shared, oversubscribed CPU every
        # small parallel op then waits for a descheduled thread, which inflates the many small ops of
        # the sparse step far more than the one big GEMM.
        default = run_worker("timing", d, m, B, args)
        keys = (
            "step_ms",
            "floor_ms",
            "dense_ms",
            "step_over_floor",
            "step_over_floor_paired",
            "dense_over_step",
            "l0",
        )
        res["default_omp_wait_policy"] = {k: default.get(k, default.get("error")) for k in keys}
        res.update(run_worker("rss", d, m, B, args))
        # glibc's dynamic mmap threshold keeps freed mid-size blocks on the heap; with a fixed
        # threshold they go back to the OS, which shows what the trainer itself holds at peak.
        # MKL also keeps its GEMM packing buffers between calls (its "fast memory manager").
        rss_keys = ("peak_rss_mb", "net_peak_rss_mb", "net_over_min")
        for name, env in (("malloc_mmap_threshold_256k", {"MALLOC_MMAP_THRESHOLD_": "262144"}),
                          ("and_mkl_fast_mm_off", {"MALLOC_MMAP_THRESHOLD_": "262144", "MKL_DISABLE_FAST_MM": "1"})):  # fmt: skip
            tuned = run_worker("rss", d, m, B, args, env)
            res[name] = {k: tuned.get(k) for k in rss_keys}
        results[f"d{d}_m{m}_b{B}"] = res
    meta = {"threads": args.threads, "reps": args.reps, "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()}  # fmt: skip
    if cuda:
        meta["gpu"] = torch.cuda.get_device_name()
    print(json.dumps({"configs": results, "meta": meta}))


if __name__ == "__main__":
    main()
