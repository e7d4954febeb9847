"""Tests of distributed.py: data-parallel and sweep-split training in 2 gloo processes on the CPU.

The multi-process tests spawn 2 workers (init via env://, MASTER_ADDR=127.0.0.1, a free port) that run
trainSAE on synthetic activations: global batch t holds GLOBAL_B rows, rank r trains on its half
(RankSlice). The single-process reference trains on the whole global batch.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dictionary_learning import distributed
from dictionary_learning.config import TrainerConfig
from dictionary_learning.distributed import RankSlice, shard
from dictionary_learning.trainer import JumpReluTrainer
from dictionary_learning.training import layer_dir, trainSAE

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

D, M, GLOBAL_B, STEPS = 16, 64, 64, 24
META = {"model": "org/tiny-model", "layer": 3, "site": "resid_post", "hook": "blocks.3.hook_resid_post",
        "dataset": "synthetic"}  # fmt: skip
RUN = dict(log_every=4, checkpoint_every=5, norm_batches=4, progress=False)


class Synthetic:
    """Deterministic global batches [GLOBAL_B, D]: the first half of the rows is narrow, the second
    wide, so the two ranks' halves have very different L0. `die_at` / `hang_at`: batch index at which
    this process exits at once (a killed rank) or sleeps (a hung rank)."""

    def __init__(self, die_at=None, hang_at=None):
        self.i, self.die_at, self.hang_at = 0, die_at, hang_at

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == self.die_at:
            os._exit(17)
        if self.i == self.hang_at:
            time.sleep(600)
        g = torch.Generator().manual_seed(1000 + self.i)
        x = torch.randn(GLOBAL_B, D, generator=g) + 0.5
        x[GLOBAL_B // 2 :] *= 3.0
        self.i += 1
        return x

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, st):
        self.i = st["i"]


def configs(n=3):
    return [TrainerConfig(activation_dim=D, dict_size=M, lr=3e-3, bandwidth=0.05, threshold_init=0.05,
                          warmup_steps=2, sparsity_warmup_steps=3, target_l0=4.0 * (i + 1), device="cpu")
            for i in range(n)]  # fmt: skip


def weights(run_dir):
    return load_file(Path(run_dir) / "sae_weights.safetensors")


def assert_close_runs(a, b, exact=False):
    ta, tb = weights(a), weights(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if exact:
            assert torch.equal(ta[k], tb[k]), f"{k} differs between {a} and {b}"
        else:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6, msg=f"{k}: {a} vs {b}")


def log_lines(run_dir):
    return [json.loads(ln) for ln in (Path(run_dir) / "training_log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- 2 processes


def _worker(rank, world, port, job):
    """One rank: join the gloo group, train, write result_{rank}.json (error text on failure)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    out, t0 = {"rank": rank}, time.time()
    try:
        distributed.init(job["mode"], device="cpu", timeout_s=job["timeout"])
        mine = job["fault"] if job["fault"] and job["fault"][0] == rank else (None, None, None)
        src = Synthetic(
            die_at=mine[2] if mine[1] == "die" else None, hang_at=mine[2] if mine[1] == "hang" else None
        )
        out["dirs"] = trainSAE(
            RankSlice(src), configs(), STEPS, job["save_dir"], META, resume=job["resume"], **RUN
        )
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["error"] = f"{type(e).__name__}: {e}"
    out["seconds"] = time.time() - t0
    Path(job["save_dir"], f"result_{rank}.json").write_text(json.dumps(out))
    if "error" not in out:
        distributed.shutdown()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forkserver():
    """A fork server that imported torch (and torch._dynamo, which Adam imports: ~4 s) once, so each
    worker starts in a fraction of a second; a clean single-threaded parent, unlike pytest's."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "dictionary_learning.training", __name__])
    return ctx


def launch(save_dir, mode, resume=False, fault=None, timeout=30.0, world=2):
    """Run `world` ranks to the end (or 90 s); returns [(exit code, result dict or None)] per rank.
    fault = (rank, "die" | "hang", batch index): that rank exits / sleeps there; a hung rank is not
    waited for, but killed once the others have reported."""
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    for f in Path(save_dir).glob("result_*.json"):
        f.unlink()
    job = dict(mode=mode, save_dir=str(save_dir), resume=resume, fault=fault, timeout=timeout)
    ctx, port = forkserver(), free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, job)) for r in range(world)]
    for p in procs:
        p.start()
    result = lambda r: Path(save_dir, f"result_{r}.json")
    hung = fault[0] if fault and fault[1] == "hang" else None
    deadline = time.time() + 90
    while time.time() < deadline and any(
        p.is_alive() and not result(r).exists() for r, p in enumerate(procs) if r != hung
    ):
        time.sleep(0.05)
    out = []
    for r, p in enumerate(procs):
        p.join(0 if r == hung else max(0.0, min(10.0, deadline - time.time())))
        if p.is_alive():
            p.kill()
            p.join()
        out.append((p.exitcode, json.loads(result(r).read_text()) if result(r).exists() else None))
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process sweep on the whole global batches."""
    out = tmp_path_factory.mktemp("single")
    return trainSAE(Synthetic(), configs(), STEPS, out, META, **RUN)


@pytest.fixture(scope="module")
def data_parallel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    results = launch(out, "data")
    for code, res in results:
        assert code == 0 and res and "error" not in res, results
    return out, results


@pytest.mark.slow
def test_data_parallel_equals_single_process_with_the_same_global_batch(single, data_parallel):
    out, results = data_parallel
    dirs = [res["dirs"] for _, res in results]
    assert dirs[0] == dirs[1] and [Path(d).name for d in dirs[0]] == [Path(d).name for d in single]
    for a, b in zip(single, dirs[0]):
        assert_close_runs(a, b)
        la, lb = log_lines(a), log_lines(b)  # global-batch statistics, logged once (rank 0 alone)
        assert [ln["step"] for ln in lb] == list(range(4, STEPS + 1, 4))
        assert [ln["tokens"] for ln in lb] == [ln["tokens"] for ln in la]
        for k in ("loss", "mse", "l0", "fve", "dead"):
            assert [ln[k] for ln in lb] == pytest.approx([ln[k] for ln in la], rel=1e-4, abs=1e-6), k


@pytest.mark.slow
def test_killed_rank_makes_the_other_fail_fast_and_resume_is_exact(tmp_path, data_parallel):
    t0 = time.time()
    results = launch(tmp_path, "data", fault=(1, "die", 13), timeout=30.0)
    assert results[1][0] == 17
    code, res = results[0]
    assert code == 0 and res["error"].startswith("DistributedError: rank 0 of 2"), res
    assert "Resume from the last checkpoint" in res["error"]
    assert time.time() - t0 < 30  # well within the 30 s timeout: a closed peer is noticed at once
    results = launch(tmp_path, "data", resume=True)
    assert all(code == 0 and "error" not in res for code, res in results), results
    for a, b in zip(data_parallel[1][0][1]["dirs"], results[0][1]["dirs"]):
        assert_close_runs(a, b, exact=True)
        assert log_lines(a) == log_lines(b)


@pytest.mark.slow
def test_hung_rank_makes_the_other_fail_after_the_timeout(tmp_path):
    results = launch(tmp_path, "data", fault=(1, "hang", 13), timeout=6.0)
    code, res = results[0]
    assert code == 0 and res["error"].startswith("DistributedError: rank 0 of 2"), res
    assert "Timed out" in res["error"] and "timeout 6 s" in res["error"] and 6 <= res["seconds"] < 40
    assert results[1][1] is None  # the hung rank never reported; the test killed it


@pytest.mark.slow
def test_sweep_split_trains_each_trainer_once_and_resumes_exactly(tmp_path, single):
    names = [Path(d).name for d in single]
    results = launch(tmp_path, "sweep", fault=(0, "die", 13))  # rank 0 (the store host) dies
    assert results[0][0] == 17 and results[1][1]["error"].startswith("DistributedError: rank 1 of 2")
    base = layer_dir(tmp_path, META)
    # round robin: rank 0 trains trainers 0 and 2, rank 1 trainer 1; each wrote its own checkpoints
    # (.lock: rank 0 held the layer folder)
    assert sorted(p.name for p in base.iterdir() if p.name != ".lock") == sorted(names)
    # trainer 1 (rank 1's) starts over: without resume, rank 0 refuses its folders and rank 1 follows
    shutil.rmtree(base / names[1])
    results = launch(tmp_path, "sweep")
    assert results[0][1]["error"].startswith("FileExistsError: ") and "rank 0: " not in results[0][1]["error"]
    assert results[1][1]["error"].startswith("FileExistsError: rank 0: "), results
    results = launch(tmp_path, "sweep", resume=True)  # trainers 0 and 2 wait for trainer 1 to reach step 10
    assert all(code == 0 and "error" not in res for code, res in results), results
    assert results[0][1]["dirs"] == results[1][1]["dirs"] == [str(base / n) for n in names]
    for a, b in zip(single, results[0][1]["dirs"]):
        assert_close_runs(a, b)  # each trainer saw the whole global batch, as in one process
        steps = [ln["step"] for ln in log_lines(b)]
        assert steps == list(range(4, STEPS + 1, 4))  # logged once: no rank trained it twice
        assert [ln["tokens"] for ln in log_lines(b)] == [ln["tokens"] for ln in log_lines(a)]


# ---------------------------------------------------------------------------- in one process


class ThreadSum:
    """reduce_sum for threads standing in for ranks: each thread's tensor becomes the rank-order sum."""

    def __init__(self, n):
        self.parts, self.barrier = [None] * n, threading.Barrier(n)

    def for_rank(self, r):
        def reduce_sum(t):
            self.parts[r] = t.clone()
            self.barrier.wait()
            total = sum(self.parts[1:], self.parts[0].clone())
            self.barrier.wait()
            t.copy_(total)

        return reduce_sum


def on_threads(fns):
    errors = []

    def run(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(f,)) for f in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def rank_trainer(cfg, reduce_sum, cls=JumpReluTrainer):
    """A trainer whose steps take the gradient of the global batch (what distributed.init's data mode
    sets up): reduce_sum(t) sums t over the ranks in place."""
    t = cls(cfg)
    t.reduce_sum = reduce_sum
    return t


def grads_of(trainer):
    return {n: p.grad.clone() for n, p in trainer.params.items()}


@pytest.mark.parametrize("mode", ["target_l0", "l0"])
@pytest.mark.parametrize("backward", ["dense", "sparse"])
def test_data_parallel_gradient_is_the_global_batch_gradient(mode, backward):
    """2 ranks x 32 rows == 1 x 64 rows for the gradient. Control: taking the sparsity term at each
    rank's LOCAL L0 (plain gradient averaging) gives a different threshold gradient in target_l0 mode."""
    cfg = configs(1)[0]
    cfg.sparsity_mode, cfg.backward, cfg.sparsity_coeff = mode, backward, 0.5
    x = Synthetic().__next__() / 2.0
    ref = JumpReluTrainer(cfg)
    s_ref = ref.compute_grads(x, coeff=0.5)
    g_ref = grads_of(ref)

    class LocalL0(JumpReluTrainer):
        def global_l0(self, l0, rows):
            return l0

    for cls, exact in ((JumpReluTrainer, True), (LocalL0, False)):
        comm = ThreadSum(2)
        ranks = [rank_trainer(cfg, comm.for_rank(r), cls) for r in range(2)]
        stats = [None, None]

        def step(r, ranks=ranks, stats=stats):
            stats[r] = ranks[r].compute_grads(x[r * 32 : (r + 1) * 32], coeff=0.5)

        on_threads([lambda r=r: step(r) for r in range(2)])
        g0, g1 = grads_of(ranks[0]), grads_of(ranks[1])
        for n in g_ref:
            assert torch.equal(g0[n], g1[n]), n  # every rank takes the same step
        if exact or mode == "l0":  # λ·L0 is linear in L0: averaging is exact there anyway
            for n in g_ref:
                torch.testing.assert_close(g0[n], g_ref[n], rtol=1e-5, atol=1e-6, msg=n)
        else:
            assert not torch.allclose(g0["threshold"], g_ref["threshold"], rtol=1e-3, atol=1e-4)
        if exact:  # the statistics are the global batch's
            for k in ("loss", "mse", "l0", "sparsity_loss"):
                torch.testing.assert_close(stats[0][k].float(), s_ref[k].float(), rtol=1e-5, atol=1e-6)
            assert torch.equal(stats[0]["fired"], s_ref["fired"])
            assert torch.equal(stats[0]["counts"], s_ref["counts"]) and stats[0]["counts"].sum() > 0


def test_data_parallel_updates_match_and_poison_a_nan_batch_on_every_rank():
    cfg = configs(1)[0]
    src = Synthetic()
    xs = [next(src) / 2.0 for _ in range(6)]
    ref = JumpReluTrainer(cfg)
    outs_ref = [ref.update(t, x) for t, x in enumerate(xs)]
    comm = ThreadSum(2)
    ranks = [rank_trainer(cfg, comm.for_rank(r)) for r in range(2)]
    outs = [[], []]

    def run(r):
        for t, x in enumerate(xs):
            outs[r].append(ranks[r].update(t, x[r * 32 : (r + 1) * 32]))

    on_threads([lambda r=r: run(r) for r in range(2)])
    for n, p in ref.params.items():
        assert torch.equal(ranks[0].params[n], ranks[1].params[n])
        torch.testing.assert_close(ranks[0].params[n], p, rtol=1e-5, atol=1e-6, msg=n)
    for a, b in zip(outs[0], outs_ref):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)  # global-batch loss, l0, fve, dead
    assert ranks[0].tokens_seen == ref.tokens_seen and torch.equal(
        ranks[0].tokens_since_fired, ref.tokens_since_fired
    )
    assert torch.equal(ranks[0].firing_density(), ref.firing_density())  # the global batches

    # NaN in rank 1's rows only: both ranks raise, so neither waits for the other's next collective
    bad = xs[0].clone()
    bad[40] = float("nan")
    errors = [None, None]

    def poisoned(r):
        try:
            ranks[r].update(6, bad[r * 32 : (r + 1) * 32])
        except FloatingPointError as e:
            errors[r] = e

    on_threads([lambda r=r: poisoned(r) for r in range(2)])
    assert all(isinstance(e, FloatingPointError) for e in errors)


def test_text_shards_are_disjoint_and_cover_the_data():
    for n in (0, 1, 7, 10, 101):
        items = [f"text {i}" for i in range(n)]
        for world in (1, 2, 3, 8):
            parts = [shard(items, r, world) for r in range(world)]
            assert sum(len(p) for p in parts) == n
            assert set().union(*map(set, parts)) == set(items)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    import datasets

    ds = datasets.Dataset.from_dict({"text": [str(i) for i in range(11)]})
    parts = [list(shard(ds, r, 3)["text"]) for r in range(3)]
    assert sorted(sum(parts, []), key=int) == list(ds["text"]) and parts[1] == ["1", "4", "7", "10"]
    with pytest.raises(ValueError, match="rank must be in"):
        shard(items, 3, 3)


def test_rank_slices_concatenate_to_the_batch_and_pass_state_through():
    slices = [RankSlice(Synthetic(), r, 3) for r in range(3)]
    full = Synthetic()
    for _ in range(3):
        assert torch.equal(torch.cat([next(s) for s in slices]), next(full))
    assert slices[2].state_dict() == {"i": 3}
    slices[2].load_state_dict({"i": 1})
    assert torch.equal(next(slices[2]), torch.tensor_split(_batch(1), 3)[2])


def _batch(i):
    src = Synthetic()
    src.load_state_dict({"i": i})
    return next(src)


def test_single_process_context_and_bad_settings(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.init("sweep")
    assert not ctx.distributed and ctx.writes_files and ctx.share([1, 2, 3]) == [1, 2, 3]
    assert ctx.pin_device("cuda") == "cuda" and ctx.local_batch_size(64) == 64
    with pytest.raises(ValueError, match="distributed mode must be one of"):
        distributed.init("pipeline")
    two = distributed.Context("sweep", rank=1, world_size=2, local_rank=1)
    assert two.share(list("abcde")) == ["b", "d"] and two.pin_device("cuda:3") == "cuda:1"
    assert not distributed.Context("data", rank=1, world_size=2).writes_files
    with pytest.raises(ValueError, match="not divisible by the world size 2"):
        two.local_batch_size(63)
