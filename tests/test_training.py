"""Tests of the training loop: sweeps, run folders, checkpoints and exact resume, failures, wandb.

Tiny dims (d=16, m=64, batch 32). Run as a script, this file is also the subprocess the kill tests
start: `python tests/test_training.py SAVE_DIR [--resume] [--sleep S]`.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dictionary_learning.checkpoint import read_checkpoint, save_checkpoint
from dictionary_learning.config import TrainerConfig
from dictionary_learning.dictionary import JumpReluAutoEncoder
from dictionary_learning.trainer import JumpReluTrainer
from dictionary_learning.training import layer_dir, log_spaced_steps, sanitize, trainSAE
from dictionary_learning.utils import DataExhausted, FolderLockedError, write_dir_atomic

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

D, M, B = 16, 64, 32
META = {"model": "org/tiny-model", "layer": 3, "site": "resid_post", "hook": "blocks.3.hook_resid_post",
        "dataset": "synthetic", "buffer": {"ctx_len": 8, "batch_size": B}}  # fmt: skip
SCRIPT_STEPS, SCRIPT_CKPT = 120, 10
CK_KW = dict(log_every=4, checkpoint_every=4, norm_batches=4, progress=False)
FULL_LOOP = dict(tokens=0, norm_factor=1.0, acc={}, last={}, rng=None, wandb_id=None)  # what trainSAE reads


class Synthetic:
    """Deterministic [B, D] batches; batch i depends only on (seed, i). state_dict = position.
    Optional `limit` (batches, then StopIteration), `sleep` per batch, and `pulls` counter."""

    def __init__(self, seed=0, limit=None, sleep=0.0):
        self.seed, self.limit, self.sleep, self.i, self.pulls = seed, limit, sleep, 0, 0
        scale = torch.linspace(0.5, 4.0, D)  # uneven widths, mean far from zero: normalisation matters
        self.scale, self.shift = scale, torch.full((D,), 2.0)

    def batch(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(B, D, generator=g) * self.scale + self.shift

    def __iter__(self):
        return self

    def __next__(self):
        if self.limit is not None and self.i >= self.limit:
            raise StopIteration
        if self.sleep:
            time.sleep(self.sleep)
        self.i += 1
        self.pulls += 1
        return self.batch(self.i - 1)

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, st):
        self.i = st["i"]


def plain(n, seed=0):
    """A plain generator (no state_dict): resume must fast-forward it."""
    src = Synthetic(seed)
    for i in range(n):
        yield src.batch(i)


def configs(n=2, **kw):
    base = dict(activation_dim=D, dict_size=M, lr=1e-3, bandwidth=0.01, threshold_init=0.01, warmup_steps=5,
                sparsity_warmup_steps=20, device="cpu")  # fmt: skip
    out = [TrainerConfig(**{**base, "target_l0": 4.0 * (i + 1), **kw}) for i in range(n)]
    return out


def tensors_of(run_dir):
    return load_file(Path(run_dir) / "sae_weights.safetensors")


def assert_same_run(a, b):
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs between {a} and {b}"
    assert (Path(a) / "training_log.jsonl").read_text() == (Path(b) / "training_log.jsonl").read_text()


# ---------------------------------------------------------------------------- subprocess runs


def script_main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("save_dir")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    trainSAE(Synthetic(seed=1, sleep=a.sleep), configs(2), SCRIPT_STEPS, a.save_dir, META, log_every=7,
             checkpoint_every=SCRIPT_CKPT, norm_batches=15, resume=a.resume, progress=False,
             snapshot_steps=[16, 64])  # fmt: skip


def run_script(save_dir, *args, wait=True, sleep=0.0):
    cmd = [sys.executable, __file__, str(save_dir), "--sleep", str(sleep), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        return r
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def trainer_dirs(save_dir):
    return sorted(p for p in layer_dir(save_dir, META).iterdir() if p.is_dir())


def wait_for_checkpoint(proc, save_dir, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, f"run ended before its first checkpoint: {proc.communicate()[1][-2000:]}"
        if layer_dir(save_dir, META).exists() and any(
            (d / "checkpoints" / "latest" / "meta.json").exists() for d in trainer_dirs(save_dir)
        ):
            return
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted subprocess run."""
    out = tmp_path_factory.mktemp("reference")
    run_script(out)
    return out


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, reference):
    proc = run_script(tmp_path, wait=False, sleep=0.01)
    wait_for_checkpoint(proc, tmp_path)
    time.sleep(0.15)  # somewhere between checkpoints
    assert proc.poll() is None, "run finished before it could be killed"
    proc.kill()
    proc.wait()
    dirs = trainer_dirs(tmp_path)
    assert len(dirs) == 2
    steps = [read_checkpoint(d / "checkpoints" / "latest")[2]["step"] for d in dirs]
    assert all(0 < s < SCRIPT_STEPS for s in steps)
    assert not any((d / "sae_weights.safetensors").exists() for d in dirs)
    run_script(tmp_path, "--resume")
    for a, b in zip(trainer_dirs(reference), dirs):
        assert a.name == b.name
        assert_same_run(a, b)
        assert json.loads((b / "status.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_sigterm_saves_loadable_checkpoint_and_resumes(tmp_path, reference):
    proc = run_script(tmp_path, wait=False, sleep=0.01)
    wait_for_checkpoint(proc, tmp_path)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM" in err and "checkpoint saved" in err
    for d in trainer_dirs(tmp_path):
        status = json.loads((d / "status.json").read_text())
        tensors, meta, loop, data_state = read_checkpoint(d / "checkpoints" / "latest")
        assert status["status"] == "interrupted" and loop["step"] == status["step"] > 0
        assert data_state["state"]["i"] + data_state["skip"] == loop["step"]  # stream position = step
        trainer = JumpReluTrainer(TrainerConfig.from_dict(meta["config"]))
        trainer.load_state_dict({"tensors": tensors, "meta": meta})
        assert trainer.step == loop["step"]
        assert torch.equal(trainer.ae.W_dec, tensors["ae.W_dec"])
    run_script(tmp_path, "--resume")
    for a, b in zip(trainer_dirs(reference), trainer_dirs(tmp_path)):
        assert_same_run(a, b)


# ---------------------------------------------------------------------------- in-process runs


def test_data_exhausted_is_loud_and_plain_iterator_resume_is_exact(tmp_path):
    ref = trainSAE(plain(100), configs(2), 60, tmp_path / "ref", META, log_every=5, checkpoint_every=25,
                   norm_batches=10, progress=False)  # fmt: skip
    with pytest.raises(DataExhausted, match=r"after 33 of 60 steps \(1056 tokens\)"):
        trainSAE(plain(33), configs(2), 60, tmp_path / "cut", META, log_every=5, checkpoint_every=25,
                 norm_batches=10, progress=False)  # fmt: skip
    cut_dirs = trainer_dirs(tmp_path / "cut")
    for d in cut_dirs:
        assert json.loads((d / "status.json").read_text())["status"] == "data_exhausted"
        assert read_checkpoint(d / "checkpoints" / "latest")[2]["step"] == 33
    out = trainSAE(plain(100), configs(2), 60, tmp_path / "cut", META, log_every=5, checkpoint_every=25,
                   norm_batches=10, progress=False, resume=True)  # fmt: skip
    assert [Path(p).name for p in out] == [Path(p).name for p in ref]
    for a, b in zip(ref, out):
        assert_same_run(a, b)


def test_signal_inside_norm_window_then_resume_is_exact(tmp_path):
    """SIGTERM at step 6 while 10 norm batches were pulled ahead: the checkpoint (step 7) stores the
    stream position before the look-ahead plus a skip count, and resume replays batches 7..9."""
    kw = dict(log_every=3, checkpoint_every=5, norm_batches=10, progress=False)
    ref = trainSAE(Synthetic(), configs(1), 30, tmp_path / "ref", META, **kw)
    trainer = JumpReluTrainer(configs(1)[0])
    update = trainer.update

    def signalling(step, x):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # handled after this step: checkpoint, then exit
        return update(step, x)

    trainer.update = signalling
    with pytest.raises(SystemExit) as exc:
        trainSAE(Synthetic(), [trainer], 30, tmp_path / "b", META, **kw)
    assert exc.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    d = trainer_dirs(tmp_path / "b")[0]
    _, _, loop, ds = read_checkpoint(d / "checkpoints" / "latest")
    assert loop["step"] == 7 and ds == {"kind": "state_dict", "state": {"i": 0}, "skip": 7, "consumed": 7}
    out = trainSAE(Synthetic(), configs(1), 30, tmp_path / "b", META, resume=True, **kw)
    assert_same_run(ref[0], out[0])


def test_activation_cache_runs_out_then_resumes_exactly(tmp_path):
    """The real ActivationCache: epochs=1 runs out (its DataExhausted -> our error, checkpoint saved);
    resuming from its state_dict with epochs=None equals an uninterrupted epochs=None run."""
    from dictionary_learning.cache import ActivationCache, write_cache

    write_cache(plain(16), tmp_path / "cache", n_tokens=16 * B, meta={"model": "m"}, shard_rows=128)
    kw = dict(log_every=5, checkpoint_every=7, norm_batches=5, progress=False)
    cache = lambda epochs: ActivationCache(tmp_path / "cache", batch_size=B, seed=0, epochs=epochs)
    ref = trainSAE(cache(None), configs(2), 40, tmp_path / "ref", META, **kw)
    with pytest.raises(DataExhausted, match=r"after 16 of 40 steps \(512 tokens\): .*exhausted"):
        trainSAE(cache(1), configs(2), 40, tmp_path / "b", META, **kw)
    out = trainSAE(cache(None), configs(2), 40, tmp_path / "b", META, resume=True, **kw)
    for a, b in zip(ref, out):
        assert_same_run(a, b)


def test_data_errors_before_and_during_training(tmp_path):
    class Sized(Synthetic):
        def __len__(self):
            return 10

    with pytest.raises(ValueError, match="data holds 10 batches but steps=20"):
        trainSAE(Sized(), configs(1), 20, tmp_path, META, progress=False)
    assert not (tmp_path / "org__tiny-model").exists()

    class Exhausting(Synthetic):
        def __next__(self):
            if self.i >= 12:
                raise DataExhausted(tokens_yielded=12 * B, texts_consumed=3, epochs=1)
            return super().__next__()

    with pytest.raises(DataExhausted, match=r"after 12 of 20 steps \(384 tokens\).*3 texts"):
        trainSAE(Exhausting(), configs(1), 20, tmp_path, META, norm_batches=4, progress=False)


def test_norm_factor_once_per_sweep_and_norm_batches_are_trained_on(tmp_path):
    data = Synthetic(seed=3)
    out = trainSAE(data, configs(2), 20, tmp_path, META, log_every=5, norm_batches=8, progress=False)
    assert data.pulls == 20  # the 8 norm batches were trained on, not thrown away
    first8 = torch.cat([data.batch(i) for i in range(8)]).double()
    want = first8.pow(2).sum(1).mean().sqrt().item()
    for d in out:
        cfg = json.loads((Path(d) / "config.json").read_text())
        assert cfg["norm_factor"] == pytest.approx(want, rel=1e-9)
        assert cfg["trainer"]["norm_factor"] == pytest.approx(want, rel=1e-9)


def test_sweep_of_three_writes_distinct_complete_folders_with_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfgs = [configs(1, dict_size=M)[0], configs(1, dict_size=2 * M)[0], configs(1, lr=3e-4, seed=1)[0]]
    out = trainSAE(Synthetic(), cfgs, 24, tmp_path, META, log_every=4, checkpoint_every=8, norm_batches=4,
                   use_wandb=True, wandb_project="test", hist_every=8, progress=False)  # fmt: skip
    names = [Path(p).name for p in out]
    assert len(set(names)) == 3
    assert names == [
        "jumprelu_w64_tl0-4_lr0.001_s0",
        "jumprelu_w128_tl0-4_lr0.001_s0",
        "jumprelu_w64_tl0-4_lr0.0003_s1",
    ]
    for p, c in zip(out, cfgs):
        p = Path(p)
        assert p.parent == tmp_path / "org__tiny-model" / "resid_post_layer3"
        cfg = json.loads((p / "config.json").read_text())
        for key in ("trainer", "model_name", "hook_name", "layer", "site", "dataset_path", "norm_factor",
                    "schedule", "versions", "git_commit", "run_meta"):  # fmt: skip
            assert key in cfg, key
        assert cfg["trainer"]["dict_size"] == c.dict_size and cfg["trainer"]["lr"] == c.lr
        assert cfg["run_meta"]["buffer"] == META["buffer"] and cfg["schedule"]["steps"] == 24
        assert "torch" in cfg["versions"] and "transformers" in cfg["versions"]
        saelens = json.loads((p / "cfg.json").read_text())
        assert saelens["d_sae"] == c.dict_size and saelens["metadata"]["hook_name"] == META["hook"]
        lines = [json.loads(x) for x in (p / "training_log.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == [4, 8, 12, 16, 20, 24]
        for key in ("step", "tokens", "loss", "mse", "l0", "fve", "dead", "lr", "sparsity_coeff"):
            assert all(math.isfinite(x[key]) for x in lines), key
        assert lines[-1]["tokens"] == 24 * B
        runs = list((p / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_nan_in_one_trainer_fails_it_and_others_complete(tmp_path):
    trainers = [JumpReluTrainer(c) for c in configs(3)]
    bad = trainers[1]
    update = bad.update

    def poisoned(step, x):
        if step == 27:
            with torch.no_grad():
                bad.ae.W_dec[0, 0] = float("nan")
        return update(step, x)

    bad.update = poisoned
    out = trainSAE(Synthetic(), trainers, 40, tmp_path, META, log_every=5, checkpoint_every=10,
                   norm_batches=4, progress=False)  # fmt: skip
    dirs = trainer_dirs(tmp_path)
    failed = layer_dir(tmp_path, META) / bad.name
    assert sorted(out) == sorted(str(d) for d in dirs if d != failed) and len(out) == 2
    info = json.loads((failed / "FAILED.json").read_text())
    assert info["status"] == "failed" and info["step"] == 27 and info["last_checkpoint_step"] == 20
    assert "non-finite step 27" in info["reason"] and "loss is nan" in info["reason"]
    assert not (failed / "sae_weights.safetensors").exists()
    assert read_checkpoint(failed / "checkpoints" / "latest")[2]["step"] == 20  # the last good one
    assert torch.isfinite(read_checkpoint(failed / "checkpoints" / "latest")[0]["ae.W_dec"]).all()
    for d in out:
        assert json.loads((Path(d) / "status.json").read_text())["status"] == "done"
        assert json.loads((Path(d) / "training_log.jsonl").read_text().splitlines()[-1])["step"] == 40
    # resume leaves finished and failed trainers alone
    again = trainSAE(Synthetic(), configs(3), 40, tmp_path, META, resume=True, progress=False)
    assert sorted(again) == sorted(out)


def test_saved_sae_reloads_from_its_folder_alone(tmp_path):
    trainer = JumpReluTrainer(configs(1)[0])
    (out,) = trainSAE(Synthetic(), [trainer], 30, tmp_path / "runs", META, norm_batches=5, progress=False)
    alone = tmp_path / "alone"
    alone.mkdir()
    for f in ("config.json", "sae_weights.safetensors"):
        shutil.copy(Path(out) / f, alone / f)
    sae = JumpReluAutoEncoder.from_pretrained(alone)
    x = Synthetic(seed=9).batch(0)
    nf = trainer.cfg.norm_factor
    assert nf is not None and nf != 1.0
    with torch.no_grad():
        want = trainer.ae(x / nf) * nf  # the in-memory SAE on normalised data, scaled back
        got, f = sae(x, output_features=True)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (f != 0).any() and torch.equal(f != 0, trainer.ae.encode(x / nf) != 0)
    assert json.loads((alone / "config.json").read_text())["norm_factor"] == nf


def test_refuses_existing_run_unless_resume_or_overwrite(tmp_path):
    kw = dict(log_every=5, norm_batches=4, progress=False)
    (out,) = trainSAE(Synthetic(), configs(1), 10, tmp_path, META, **kw)
    weights = (Path(out) / "sae_weights.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="finished run.*resume=True.*overwrite=True"):
        trainSAE(Synthetic(), configs(1), 10, tmp_path, META, **kw)
    assert trainSAE(Synthetic(), configs(1), 10, tmp_path, META, resume=True, **kw) == [out]
    assert (Path(out) / "sae_weights.safetensors").read_bytes() == weights  # untouched
    (out2,) = trainSAE(Synthetic(seed=5), configs(1), 10, tmp_path, META, overwrite=True, **kw)
    assert out2 == out and (Path(out) / "sae_weights.safetensors").read_bytes() != weights
    with pytest.raises(ValueError, match="not both"):
        trainSAE(Synthetic(), configs(1), 10, tmp_path, META, resume=True, overwrite=True)
    with pytest.raises(ValueError, match="names must be distinct"):
        trainSAE(Synthetic(), configs(1) * 2, 10, tmp_path / "x", META)


def test_second_process_cannot_train_into_a_running_run(tmp_path):
    """While one process trains a sweep, another is refused (FolderLockedError naming the folder), even
    with overwrite=True, and touches nothing; once the first is killed (the OS drops its locks), the
    second resumes it."""
    proc = run_script(tmp_path, wait=False, sleep=0.05)
    try:
        wait_for_checkpoint(proc, tmp_path)
        configs_before = {d: (d / "config.json").read_bytes() for d in trainer_dirs(tmp_path)}
        for kw in (dict(resume=True), dict(overwrite=True)):
            with pytest.raises(
                FolderLockedError, match=r"jumprelu_w64_.*another process is using this run folder"
            ):
                trainSAE(Synthetic(seed=1), configs(2), SCRIPT_STEPS, tmp_path, META, progress=False, **kw)
        assert proc.poll() is None  # still training, undisturbed; overwrite=True removed nothing
        assert {d: (d / "config.json").read_bytes() for d in trainer_dirs(tmp_path)} == configs_before
    finally:
        proc.kill()
        proc.wait()
    done = trainSAE(Synthetic(seed=1), configs(2), SCRIPT_STEPS, tmp_path, META, log_every=7,
                    checkpoint_every=SCRIPT_CKPT, norm_batches=15, resume=True, progress=False)  # fmt: skip
    assert len(done) == 2


def test_locks_released_after_an_error_and_without_flock(tmp_path, monkeypatch, caplog):
    """A refused call (FileExistsError) leaves no lock behind in this process: the retry with
    overwrite=True runs. Without fcntl (Windows) or with a file system that refuses flock, training
    runs unlocked (with a warning for the latter)."""
    kw = dict(log_every=5, norm_batches=4, progress=False)
    trainSAE(Synthetic(), configs(2), 10, tmp_path, META, **kw)
    with pytest.raises(FileExistsError) as refused:  # its traceback (and the frames) stays alive
        trainSAE(Synthetic(), configs(2), 10, tmp_path, META, **kw)
    assert len(trainSAE(Synthetic(), configs(2), 10, tmp_path, META, overwrite=True, **kw)) == 2
    assert refused.traceback  # still held while the retry ran

    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError
    assert len(trainSAE(Synthetic(), configs(1), 10, tmp_path / "no_fcntl", META, **kw)) == 1
    monkeypatch.undo()

    import fcntl

    def refuse(*_):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    assert len(trainSAE(Synthetic(), configs(1), 10, tmp_path / "no_flock", META, **kw)) == 1
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text


def test_resume_with_a_changed_config_is_refused(tmp_path):
    with pytest.raises(DataExhausted):
        trainSAE(Synthetic(limit=8), configs(1), 20, tmp_path, META, norm_batches=4, checkpoint_every=4,
                 progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="cannot resume: .*max_grad_norm"):
        trainSAE(Synthetic(), configs(1, max_grad_norm=0.5), 20, tmp_path, META, resume=True, progress=False)


def test_checkpoint_swap_survives_a_kill_at_any_point(tmp_path):
    final = tmp_path / "latest"

    def writer(tag):
        def write(tmp):
            (tmp / "meta.json").write_text(json.dumps({"tag": tag}))

        return write

    write_dir_atomic(final, writer("one"))
    # a writer that dies half-way leaves the old checkpoint in place
    with pytest.raises(RuntimeError):
        write_dir_atomic(final, lambda tmp: (_ for _ in ()).throw(RuntimeError("killed")))
    assert json.loads((final / "meta.json").read_text()) == {"tag": "one"}
    write_dir_atomic(final, writer("two"))
    assert json.loads((final / "meta.json").read_text()) == {"tag": "two"}
    assert not (tmp_path / "latest.old").exists()
    # killed between `latest -> latest.old` and `tmp -> latest`: the reader falls back to .old
    trainer = JumpReluTrainer(configs(1)[0])
    loop3 = {**FULL_LOOP, "step": 3}
    save_checkpoint(tmp_path / "ck" / "latest", trainer, loop3, {"kind": "skip", "consumed": 3})
    os.rename(tmp_path / "ck" / "latest", tmp_path / "ck" / "latest.old")
    (tmp_path / "ck" / "latest.tmp-999").mkdir()  # a half-written one from the killed process
    tensors, meta, loop, ds = read_checkpoint(tmp_path / "ck" / "latest")
    assert loop == loop3 and ds["consumed"] == 3 and torch.equal(tensors["ae.W_enc"], trainer.ae.W_enc)
    assert read_checkpoint(tmp_path / "nothing" / "latest") is None


def _stopped_at_12(save_dir) -> Path:
    """A run the data stopped at step 12 of 20 (checkpoint saved); returns its checkpoints/ folder."""
    with pytest.raises(DataExhausted):
        trainSAE(Synthetic(limit=12), configs(1), 20, save_dir, META, **CK_KW)
    return trainer_dirs(save_dir)[0] / "checkpoints"


def _damage(latest: Path, how: str) -> None:
    if how == "no meta.json":
        (latest / "meta.json").unlink()
    elif how == "truncated trainer.safetensors":
        f = latest / "trainer.safetensors"
        f.write_bytes(f.read_bytes()[:200])
    elif how == "meta.json without loop.acc":
        meta = json.loads((latest / "meta.json").read_text())
        del meta["loop"]["acc"]
        (latest / "meta.json").write_text(json.dumps(meta))
    elif how == "meta.json not JSON":
        (latest / "meta.json").write_text('{"trainer": {')


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


DAMAGE = {  # how -> what the one-line error must name
    "no meta.json": r"latest/meta\.json",
    "truncated trainer.safetensors": r"latest/trainer\.safetensors",
    "meta.json without loop.acc": r"latest/meta\.json.*'loop\.acc'",
    "meta.json not JSON": r"latest/meta\.json",
}


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_checkpoint_stops_resume_and_is_left_alone(tmp_path, how):
    """Issue 16, defects 3 and 13: a damaged checkpoints/latest without a complete latest.old stops the
    resume with one line naming the file, instead of restarting at step 0 (or a KeyError/SafetensorError),
    and nothing in checkpoints/ is touched."""
    ck = _stopped_at_12(tmp_path)
    _damage(ck / "latest", how)
    before = _files(ck)
    with pytest.raises(ValueError, match=DAMAGE[how]) as err:
        trainSAE(Synthetic(), configs(1), 20, tmp_path, META, resume=True, **CK_KW)
    assert "\n" not in str(err.value) and "overwrite=True" in str(err.value)
    assert _files(ck) == before
    assert not (ck.parent / "sae_weights.safetensors").exists()


@pytest.mark.parametrize("how", list(DAMAGE)[:3])
def test_damaged_latest_falls_back_to_a_complete_old_exactly(tmp_path, how):
    """Issue 16, defects 3 and 13: with a complete latest.old beside the damaged latest, resume continues
    from latest.old, and the result equals an uninterrupted run's bit for bit."""
    (ref,) = trainSAE(Synthetic(), configs(1), 20, tmp_path / "ref", META, **CK_KW)
    ck = _stopped_at_12(tmp_path / "b")
    shutil.copytree(ck / "latest", ck / "latest.old")
    _damage(ck / "latest", how)
    (out,) = trainSAE(Synthetic(), configs(1), 20, tmp_path / "b", META, resume=True, **CK_KW)
    assert_same_run(ref, out)


def test_fallback_to_old_survives_a_kill_in_the_next_checkpoint_write(tmp_path, monkeypatch):
    """Issue 16, defect 3: after resuming from latest.old (latest damaged), a kill inside the next
    checkpoint write, just before the new folder is renamed into place, still leaves a complete checkpoint."""
    trainer = JumpReluTrainer(configs(1)[0])
    latest = tmp_path / "checkpoints" / "latest"
    save_checkpoint(latest, trainer, {**FULL_LOOP, "step": 3}, {"kind": "skip", "consumed": 3})
    shutil.copytree(latest, latest.with_name("latest.old"))
    _damage(latest, "truncated trainer.safetensors")
    assert read_checkpoint(latest)[2]["step"] == 3
    real_rename = os.rename

    def killed_before_swap(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError("killed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_before_swap)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(latest, trainer, {**FULL_LOOP, "step": 4}, {"kind": "skip", "consumed": 4})
    monkeypatch.undo()
    tensors, _, loop, _ = read_checkpoint(latest)
    assert loop["step"] == 3 and torch.equal(tensors["ae.W_enc"], trainer.ae.W_enc)


def test_runs_shorter_than_the_norm_estimate_use_every_batch(tmp_path):
    """Issue 16, defect 7: a run of 10 steps from a cache holding exactly 10 batches (demo.py's cache mode
    with --tokens 8192 --batch-size 512 is the same) trains; the norm factor comes from all 10 batches,
    not the default 32 (which used to exhaust the data before the first step)."""
    from dictionary_learning.cache import ActivationCache, write_cache

    write_cache(plain(10), tmp_path / "cache", n_tokens=10 * B, meta={"model": "m"}, shard_rows=64)
    cache = ActivationCache(tmp_path / "cache", batch_size=B, seed=0, epochs=1)
    (out,) = trainSAE(cache, configs(1), 10, tmp_path / "run", META, log_every=5, progress=False)
    rows = torch.cat([Synthetic().batch(i) for i in range(10)]).double()  # every row, in any order
    want = rows.pow(2).sum(1).mean().sqrt().item()
    cfg = json.loads((Path(out) / "config.json").read_text())
    assert cfg["norm_factor"] == pytest.approx(want, rel=1e-6)
    assert cfg["schedule"]["norm_batches"] == 10


class Counting(Synthetic):
    """Synthetic data with a massive-token record that grows as batches are read (as ActivationBuffer's:
    its threshold and count are known only once it has harvested)."""

    @property
    def massive(self) -> dict:
        return {"dropped": self.i, "of_tokens": self.i * B}


def test_massive_record_is_the_one_applied_so_far_in_snapshots_and_final_config(tmp_path):
    meta = {**META, "buffer": {**META["buffer"], "massive_tokens": {"dropped": 0, "of_tokens": 0}}}
    data = Counting()
    (out,) = trainSAE(data, configs(1), 12, tmp_path, meta, log_every=4, norm_batches=4, snapshot_steps=[6],
                      progress=False)  # fmt: skip
    final = json.loads((Path(out) / "config.json").read_text())
    assert final["massive_tokens"] == {"dropped": data.i, "of_tokens": data.i * B} and data.i >= 12
    assert "massive_tokens" not in final["run_meta"]["buffer"]  # one record, not a stale copy
    snap = json.loads((Path(out) / "checkpoints" / "step_00000006" / "config.json").read_text())
    assert 6 <= snap["massive_tokens"]["dropped"] < data.i  # read so far at step 6 (4 norm batches ahead)


def test_folder_names_and_snapshot_schedule():
    assert sanitize("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB__SmolLM2-135M"
    assert layer_dir("runs", META) == Path("runs/org__tiny-model/resid_post_layer3")
    with pytest.raises(ValueError, match="layer"):
        layer_dir("runs", {"model": "m", "site": "resid_post"})
    assert log_spaced_steps(1000) == [64, 128, 256, 512]
    assert log_spaced_steps(10, first=1) == [1, 2, 4, 8]


# ---------------------------------------------------------------------------- issue 16: locks, disk full, status


def _lockable_by_another_process(folder: Path) -> bool:
    """Whether another process could take a shared flock on folder/.lock now."""
    code = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'a'), fcntl.LOCK_SH | fcntl.LOCK_NB)"
    return (
        subprocess.run([sys.executable, "-c", code, str(folder / ".lock")], capture_output=True).returncode
        == 0
    )


def test_layer_folder_lock_is_shared_by_sweeps_and_exclusive_for_a_demo_run(tmp_path, lock_holder):
    """Issue 16, defect 1: trainSAE holds the layer folder shared (sweeps of other trainers may train
    into it at once, each trainer folder locked alone); demo.run holds it exclusively, so neither
    starts while the other runs, and a refused trainSAE creates nothing. Within one process the hold
    is re-entrant, and dropped only when the outermost hold ends."""
    from dictionary_learning.training import hold_run_folder

    base, kw = layer_dir(tmp_path / "a", META), dict(log_every=5, norm_batches=4, progress=False)
    lock_holder(base)  # another process holds it exclusively, as demo.run does
    with pytest.raises(
        FolderLockedError, match=re.escape(f"{base}: another process is using this run folder")
    ):
        trainSAE(Synthetic(), configs(1), 10, tmp_path / "a", META, **kw)
    assert [p.name for p in base.iterdir()] == [".lock"]

    base = layer_dir(tmp_path / "b", META)
    lock_holder(base, shared=True)  # another sweep trains into this layer folder
    assert len(trainSAE(Synthetic(), configs(1), 10, tmp_path / "b", META, **kw)) == 1
    with pytest.raises(FolderLockedError, match=re.escape(f"{base}: another process")):
        with hold_run_folder(base):  # a demo.py run is refused
            pass

    base = layer_dir(tmp_path / "c", META)
    with hold_run_folder(base):  # demo.run's hold, with trainSAE inside it
        assert not _lockable_by_another_process(base)
        assert len(trainSAE(Synthetic(), configs(1), 10, tmp_path / "c", META, **kw)) == 1
        assert not _lockable_by_another_process(base)  # still held after trainSAE's own hold ended
    assert _lockable_by_another_process(base)


def _full_disk(real_save, fail_on, kind):
    """A safetensors save_file that, on its `fail_on`-th call, leaves a partial file and fails as a full
    disk does (kind: safetensors' error as it really reads, or a plain OSError ENOSPC)."""
    from safetensors import SafetensorError

    calls = []

    def save(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == fail_on:
            Path(path).write_bytes(b"\0" * 100)
            if kind == "SafetensorError":
                raise SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)"
                )
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *a, **k)

    return save


@pytest.mark.parametrize("kind", ["SafetensorError", "OSError"])
def test_disk_full_in_a_checkpoint_fails_the_run_in_one_line_and_resume_is_exact(tmp_path, monkeypatch, kind):
    """Issue 16, defect 12: a full disk while writing the checkpoint at step 8 raises one line naming it
    ("no space left on device: PATH", an OSError; was a SafetensorError traceback), marks the run failed
    in status.json (was "running"), leaves no latest.tmp-PID folder and keeps the step-4 checkpoint; once
    there is space, --resume finishes the run bit for bit as an undisturbed one."""
    from dictionary_learning import checkpoint

    (ref,) = trainSAE(Synthetic(), configs(1), 20, tmp_path / "ref", META, **CK_KW)
    monkeypatch.setattr(
        checkpoint, "save_file", _full_disk(checkpoint.save_file, 2, kind)
    )  # checkpoints 4, 8
    with pytest.raises(OSError) as err:
        trainSAE(Synthetic(), configs(1), 20, tmp_path / "b", META, **CK_KW)
    (d,) = trainer_dirs(tmp_path / "b")
    latest = d / "checkpoints" / "latest"
    assert str(err.value) == f"no space left on device: {latest}" and err.value.errno == errno.ENOSPC
    status = json.loads((d / "status.json").read_text())
    assert status == {"status": "failed", "step": 8, "reason": str(err.value), "last_checkpoint_step": 4}
    assert [p.name for p in d.rglob("*tmp*")] == []
    assert read_checkpoint(latest)[2]["step"] == 4
    monkeypatch.undo()
    (out,) = trainSAE(Synthetic(), configs(1), 20, tmp_path / "b", META, resume=True, **CK_KW)
    assert_same_run(ref, out)


def test_disk_full_in_the_final_save_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """Issue 16, defect 12: the final SAE is written into .final.tmp-PID; a full disk there names the
    weights file, removes the temporary folder and marks the run failed."""
    from dictionary_learning import dictionary

    monkeypatch.setattr(dictionary, "save_file", _full_disk(dictionary.save_file, 1, "SafetensorError"))
    with pytest.raises(OSError, match="no space left on device: .*sae_weights.safetensors"):
        trainSAE(Synthetic(), configs(1), 8, tmp_path, META, **CK_KW)
    (d,) = trainer_dirs(tmp_path)
    assert [p.name for p in d.rglob("*tmp*")] == []
    assert json.loads((d / "status.json").read_text())["status"] == "failed"


def test_status_shows_the_step_and_tokens_of_each_checkpoint(tmp_path):
    """Issue 16, Also: status.json is updated at each checkpoint (it showed step 0 for the whole run)."""
    status = layer_dir(tmp_path, META) / configs(1)[0].name / "status.json"
    seen = {}

    class Watched(Synthetic):
        def __next__(self):  # what status.json says when batch i is drawn
            seen[self.i] = json.loads(status.read_text()) if status.exists() else None
            return super().__next__()

    trainSAE(Watched(), configs(1), 20, tmp_path, META, **CK_KW)  # checkpoints after steps 4, 8, 12, 16
    # batches 0-3 are drawn for the norm estimate; batch i >= 4 is drawn once i steps are done
    for i in range(4, 20):
        step = 4 * (i // 4)
        assert seen[i]["status"] == "running" and (seen[i]["step"], seen[i]["tokens"]) == (step, step * B), i


def test_resume_removes_the_temporaries_a_killed_run_left(tmp_path):
    """Issue 16, Also: .final.tmp-PID, latest.tmp-PID and step_*.tmp-PID of a dead process are removed
    by the next run into the folder (holding its lock); those of a live process are left."""
    ck = _stopped_at_12(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stale = [
            ck.parent / f".final.tmp-{dead}",
            ck / f"latest.tmp-{dead}",
            ck / f"step_00000016.tmp-{dead}",
        ]
        for p in [*stale, ck / f"latest.tmp-{alive.pid}"]:
            p.mkdir()
            (p / "sae_weights.safetensors").write_bytes(b"partial")
        (out,) = trainSAE(Synthetic(), configs(1), 20, tmp_path, META, resume=True, **CK_KW)
        assert [p for p in stale if p.exists()] == []
        assert (ck / f"latest.tmp-{alive.pid}" / "sae_weights.safetensors").exists()
    finally:
        alive.kill()
        alive.wait()


if __name__ == "__main__":
    script_main()
