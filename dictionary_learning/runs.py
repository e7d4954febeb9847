"""Run folders: what training.trainSAE keeps on disk, and the bookkeeping around its loop.

RunFolder is one trainer's folder `{save_dir}/{model}/{site}_layer{L}/{trainer.name}/`:
  config.json, sae_weights.safetensors, cfg.json   final SAE (trainer.save; norm factor folded in)
  training_log.jsonl                               one JSON line per log step
  status.json (+ FAILED.json on failure)           running / done / failed / data_exhausted / interrupted
  checkpoints/step_XXXXXXXX/                       SAE-only snapshots on a log-spaced schedule
  checkpoints/latest/                              full state for exact resume (checkpoint.py)
  .lock                                            held (flock) by the process training into it
It owns the lock, the log, checkpoints, status (step and tokens updated at each checkpoint), the NaN
handling (a non-finite loss or gradient fails that trainer alone, for good: FAILED.json, its last good
checkpoint kept), wandb and the final save. Any other error (a full disk: NoSpaceError) marks the run
failed in status.json, resumable from its checkpoint. Sweep holds the RunFolders of one sweep and what
they share: the data stream, the stop signals, the progress bar and, under torchrun, the collectives
(distributed.Context).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

from .checkpoint import (
    DataStream,
    read_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    save_final,
    set_rng_state,
    truncate_log,
)
from .trainer import estimate_norm_factor
from .utils import (
    LOCK_FILE,
    DataExhausted,
    NoSpaceError,
    disk_full,
    lock_folder,
    read_json,
    write_dir_atomic,
    write_json,
)

log = logging.getLogger(__name__)

LOG_FILE = "training_log.jsonl"
STATUS_FILE = "status.json"
FAILED_FILE = "FAILED.json"
AVERAGED = ("loss", "mse", "sparsity_loss", "pre_act_loss", "l0", "frac_variance_explained",
            "frac_variance_explained_centred")  # window means in the log  # fmt: skip
LOG_KEYS = {"frac_variance_explained": "fve", "frac_variance_explained_centred": "fve_centred",
            "frac_dead": "dead"}  # update() key -> log key  # fmt: skip
SAE_FILES = ("sae_weights.safetensors", "config.json", "cfg.json")


class RunFolder:
    """One trainer and its folder. `writes` False: a data-parallel rank > 0, which trains but writes nothing."""

    def __init__(self, trainer, path: Path, writes: bool = True):
        self.trainer, self.dir, self.writes = trainer, Path(path), writes
        self.start = 0  # completed steps when this process began
        self.acc: dict = {}  # window sums for the log
        self.last: dict = {}  # last logged line
        self.active = True
        self.cfg: dict = {}  # config.json contents
        self.ckpt_step: int | None = None  # step of checkpoints/latest
        self.wandb, self.wandb_id, self._lock = None, None, None
        self.began = False  # status "running" written by this process

    def status(self) -> dict:
        f = self.dir / STATUS_FILE
        return read_json(f) if f.exists() else {}

    def lock(self) -> None:
        self._lock = lock_folder(self.dir, "run folder (training)")

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def open(self, resume: bool, overwrite: bool) -> tuple | None:
        """Refuse, clear or resume the (locked) folder; its checkpoint when resuming from one. Temporaries
        left by a killed process go first; a run failed by a non-finite step (FAILED.json) is final."""
        remove_stale_temporaries(self.dir)
        contents = [p for p in self.dir.iterdir() if p.name != LOCK_FILE]
        status = self.status().get("status")
        if contents and overwrite:
            for p in contents:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif contents and not resume:
            what = "a finished run" if status == "done" else "an unfinished run"
            raise FileExistsError(
                f"{self.dir}: holds {what}; pass resume=True to continue it or overwrite=True"
            )
        if resume and (status == "done" or (self.dir / FAILED_FILE).exists()):
            log.info("%s: already %s, skipped", self.dir, status)
            self.active = False
            self.unlock()
            return None
        return read_checkpoint(self.dir / "checkpoints" / "latest") if resume else None

    def begin(self, cfg: dict, checkpoint: tuple | None, wandb_kw: dict | None) -> None:
        """Restore the trainer from `checkpoint` (if any), then write config.json, status and start wandb."""
        self.cfg = cfg
        if checkpoint is not None:
            tensors, meta, loop, _ = checkpoint
            try:
                self.trainer.load_state_dict({"tensors": tensors, "meta": meta})
            except ValueError as e:
                raise ValueError(
                    f"{self.dir}: cannot resume: {e}; use the original config or overwrite=True"
                ) from None
            self.start = self.ckpt_step = loop["step"]
            self.acc, self.last, self.wandb_id = loop["acc"], loop["last"], loop["wandb_id"]
        if not self.writes:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        truncate_log(self.dir / LOG_FILE, self.start)
        write_json(self.dir / "config.json", cfg)
        write_json(self.dir / STATUS_FILE, {"status": "running", "step": self.start})
        self.began = True
        if wandb_kw is not None:  # one run per trainer, from this process; offline with WANDB_MODE=offline
            import wandb

            self.wandb_id = self.wandb_id or os.urandom(6).hex()
            self.wandb = wandb.init(**wandb_kw, name=self.trainer.name, id=self.wandb_id, resume="allow",
                                    dir=str(self.dir), config=cfg, reinit="create_new")  # fmt: skip

    def update(self, step: int, x) -> None:
        """One training step; a non-finite loss or gradient fails this trainer alone (FAILED.json)."""
        try:
            out = self.trainer.update(step, x)
        except FloatingPointError as e:
            return self.fail(step, str(e))
        if self.writes:
            for k in AVERAGED:
                if k in out:
                    self.acc[k] = self.acc.get(k, 0.0) + float(out[k])
            self.acc["n"] = self.acc.get("n", 0) + 1
            self.acc["now"] = {k: float(v) for k, v in out.items() if k not in AVERAGED}

    def fail(self, step: int, why: str) -> None:
        self.active = False
        if not self.writes:  # data-parallel rank > 0: rank 0 writes the same failure
            return
        ck = self.ckpt_step
        last = "no checkpoint yet" if ck is None else f"last good checkpoint: checkpoints/latest (step {ck})"
        msg = f"{self.trainer.name}: non-finite step {step} ({why}); trainer stopped, {last}"
        log.error(msg)
        info = {"status": "failed", "step": step, "reason": msg, "last_checkpoint_step": ck}
        write_json(self.dir / FAILED_FILE, info)
        write_json(self.dir / STATUS_FILE, info)
        self.close(exit_code=1)

    def log_line(self, step: int, tokens: int, hist: bool) -> str:
        """Append the window's means (and the last validation) to the log and wandb; a progress snippet."""
        n = max(self.acc.get("n", 0), 1)
        vals = {**{k: self.acc[k] / n for k in AVERAGED if k in self.acc}, **self.acc.get("now", {})}
        line = {"step": step, "tokens": tokens, **{LOG_KEYS.get(k, k): v for k, v in vals.items()}}
        line.update({f"val_{LOG_KEYS.get(k, k)}": v for k, v in self.acc.get("val", {}).items()})
        with open(self.dir / LOG_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")
        self.acc, self.last = {}, line
        if self.wandb is not None:
            point = {k: v for k, v in line.items() if k != "step"}
            if hist:  # log10 firing frequency of each latent over the tokens since the last histogram
                import wandb

                freq = self.trainer.firing_density()
                point["feature_density_log10"] = wandb.Histogram(freq[freq > 0].log10().cpu().numpy())
                point["frac_silent_in_window"] = float((freq == 0).float().mean())
            self.wandb.log(point, step=step)
        val = f" val fve {line['val_fve']:.3f}" if "val_fve" in line else ""
        return (
            f"loss {line['loss']:.3g} L0 {line['l0']:.1f} fve {line['fve']:.3f}{val} dead {line['dead']:.2f}"
        )

    def snapshot(self, step: int) -> None:
        write_dir_atomic(
            self.dir / "checkpoints" / f"step_{step:08d}", lambda t: self.trainer.save(t, self.cfg)
        )

    def checkpoint(self, step: int, tokens: int, data_state: dict, rng: dict) -> None:
        loop = dict(step=step, tokens=tokens, norm_factor=self.cfg["norm_factor"], acc=self.acc, last=self.last,
                    rng=rng, wandb_id=self.wandb_id, trainer_config=self.trainer.cfg.to_dict())  # fmt: skip
        save_checkpoint(self.dir / "checkpoints" / "latest", self.trainer, loop, data_state)
        self.ckpt_step = step
        write_json(self.dir / STATUS_FILE, {**self.last, "status": "running", "step": step, "tokens": tokens})

    def finish(self, step: int, tokens: int, extra: dict) -> None:
        """The final SAE (checkpoint.save_final); status 'done' last."""
        save_final(self.dir, self.trainer, {**self.cfg, "tokens": tokens, **extra})
        write_json(self.dir / STATUS_FILE, {**self.last, "status": "done", "step": step, "tokens": tokens})

    def failed_by(self, error: Exception, step: int) -> None:
        """An error stopped the run this process began: status "failed", its reason (one line)."""
        if self.began and self.writes and self.status().get("status") == "running":
            why = (str(error).strip().splitlines() or [type(error).__name__])[0]
            try:
                write_json(self.dir / STATUS_FILE, {"status": "failed", "step": max(step, self.start),
                                                    "reason": why, "last_checkpoint_step": self.ckpt_step})  # fmt: skip
            except OSError as e:  # the disk may still be full
                log.warning("%s: cannot mark the run failed (%s)", self.dir, e)

    def close(self, exit_code: int | None = None) -> None:
        self.unlock()
        if self.wandb is not None:
            done = self.status().get("status") == "done"
            self.wandb.finish(exit_code=exit_code if exit_code is not None else 0 if done else 1)
            self.wandb = None


class Sweep:
    """The RunFolders of one sweep, trained on the same batches, and what they share. A context manager:
    SIGINT/SIGTERM finish the step, save a checkpoint and exit 128+signum (a second signal acts at once);
    on exit the folders are unlocked, the handlers restored, wandb runs finished, and on an error the
    running trainers marked failed (a full disk: NoSpaceError, naming a folder)."""

    def __init__(self, runs: list[RunFolder], ctx, base: Path, steps: int, progress: bool = True):
        self.runs, self.ctx, self.base, self.steps, self.progress = runs, ctx, base, steps, progress
        self.signal, self.exhausted, self.bar, self._prev = None, None, None, {}
        self.stream: DataStream | None = None
        self.step = 0  # steps completed

    def __enter__(self) -> Sweep:
        if threading.current_thread() is threading.main_thread():
            self._prev = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _on_signal(self, signum, frame):
        self.signal = signum
        signal.signal(signum, self._prev[signum])
        log.warning("%s received: saving a checkpoint, then exiting", signal.Signals(signum).name)

    def __exit__(self, exc_type, exc, tb):
        error = exc if isinstance(exc, Exception) else None
        if error is not None and disk_full(error) and not isinstance(error, NoSpaceError):
            error = NoSpaceError(self.base)  # an OSError that names no file (the log, wandb)
        for r in self.runs:
            if error is not None:
                r.failed_by(error, self.step)
            r.close()
        for s, h in self._prev.items():
            if signal.getsignal(s) == self._on_signal:
                signal.signal(s, h)
        if self.bar is not None:
            self.bar.close()
        if error is not None and error is not exc:
            raise error from exc

    def active(self, step: int | None = None) -> list[RunFolder]:
        """The trainers still training (at `step`: a trainer resumed from a later checkpoint waits)."""
        return [r for r in self.runs if r.active and (step is None or step >= r.start)]

    def open(self, data, resume: bool, overwrite: bool) -> tuple[DataStream, int, int]:
        """Lock every folder (all first: fail before touching any), refuse, clear or resume each; return
        the data stream at the least advanced trainer's position, that step and the tokens done."""

        def open_all(runs, resume, overwrite):
            try:
                for r in runs:
                    r.lock()
                return {i: ck for i, r in enumerate(runs) if (ck := r.open(resume, overwrite)) is not None}
            except BaseException:
                for r in runs:
                    r.unlock()
                raise

        self.ckpts = self.ctx.open_runs(open_all, self.runs, resume, overwrite)
        stream = self.stream = DataStream(data)
        tokens = 0
        here = [
            self.ckpts[i][2]["step"] if i in self.ckpts else 0 for i, r in enumerate(self.runs) if r.active
        ]
        start, point = self.ctx.resume_point(min(here, default=None), self.ckpts)  # over all ranks
        if start > 0:  # the stream goes back to the least advanced trainer's position; then the RNGs
            stream.load_state_dict(point["data"])
            set_rng_state(point["rng"])
            tokens = point["tokens"]
            log.info("resuming at step %d (%d tokens done)", start, tokens)
        return stream, start, tokens

    def norm_factor(self, stream: DataStream, norm_batches: int) -> float | None:
        """One norm factor sqrt(E‖x‖²) for the sweep (Gemma Scope §3.1): a resumed run's, else from the
        first norm_batches, which are then trained on; None when every config has its own."""
        nf = self.ctx.first(next((ck[2]["norm_factor"] for ck in self.ckpts.values()), None))
        need = self.ctx.any(any(r.trainer.cfg.norm_factor is None for r in self.active()))
        if nf is not None or norm_batches <= 0 or not need:
            return nf
        try:
            if self.ctx.distributed:  # pooled over the ranks' batches
                nf = self.ctx.norm_factor(lambda: stream.prefetch(norm_batches))
            else:
                nf = float(estimate_norm_factor(stream.prefetch(norm_batches)))
        except (StopIteration, DataExhausted) as e:
            raise DataExhausted(
                message=f"data ran out within the {norm_batches} norm-estimate batches {e}"
            ) from None
        log.info("norm factor %.6g from %d batches (kept for training)", nf, norm_batches)
        return nf

    def begin(self, run_config, norm_factor: float | None, wandb_kw: dict | None) -> None:
        """Set each trainer's norm factor (its checkpoint's when resuming), restore it, write its folder."""
        for i, r in enumerate(self.runs):
            if r.active:
                nf = (
                    self.ckpts[i][2]["norm_factor"]
                    if i in self.ckpts
                    else r.trainer.cfg.norm_factor or norm_factor
                )
                if nf is not None:
                    r.trainer.set_norm_factor(nf)
                r.begin(run_config(r.trainer, nf), self.ckpts.get(i), wandb_kw)

    def next_batch(self, stream: DataStream, tokens: int):
        """(x, tokens of one step over all ranks), or None when the data ran out or a signal came (here or
        on another rank)."""
        try:
            got = self.ctx.next_batch(stream, stopping=self.signal is not None)
        except (StopIteration, DataExhausted) as e:
            self.exhausted = e
            return None
        if got is None:
            self.signal = self.signal or signal.SIGTERM
        elif self.bar is None:
            self.t0, self.tokens0 = time.time(), tokens
            self.bar = tqdm(total=self.steps * got[1], initial=tokens, unit="tok", unit_scale=True,
                            disable=not self.progress or not self.ctx.is_main, dynamic_ncols=True)  # fmt: skip
        return got

    def update(self, step: int, x, n_tokens: int) -> None:
        """One step of every active trainer (one copy of the batch per device)."""
        on_device = {}
        for r in self.active(step):
            dev = str(r.trainer.device)
            if dev not in on_device:
                on_device[dev] = x.to(r.trainer.device)
            r.update(step, on_device[dev])
        self.step = step + 1
        if not self.ctx.any(bool(self.active())):
            raise RuntimeError(
                f"every trainer failed (non-finite step) by step {step + 1}; see FAILED.json in {self.base}"
            )
        self.bar.update(n_tokens)

    def validate(self, validation, step: int) -> None:
        for r in self.active():
            if r.writes and step > r.start:
                r.acc["val"] = r.trainer.validate(validation)

    def log(self, step: int, tokens: int, hist: bool) -> None:
        post = [f"{i}: {r.log_line(step, tokens, hist)}" for i, r in enumerate(self.runs)
                if r.active and r.writes and step > r.start]  # fmt: skip
        if post:
            rate = (tokens - self.tokens0) / max(time.time() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s | " + " | ".join(post))
            (log.debug if self.progress else log.info)(
                "step %d/%d %.0f tok/s %s", step, self.steps, rate, " | ".join(post)
            )

    def massive(self) -> dict:
        """{"massive_tokens": the data's massive-token record as applied so far} (ActivationBuffer,
        ActivationCache: the threshold and count are known only once data has been read), or {}."""
        record = getattr(getattr(self.stream, "data", None), "massive", None)
        return {} if record is None else {"massive_tokens": record}

    def snapshot(self, step: int) -> None:
        extra = self.massive()
        for r in self.active():
            if r.writes and step > r.start:
                r.cfg.update(extra)
                r.snapshot(step)

    def checkpoint(self, step: int, tokens: int, stream: DataStream) -> None:
        ds, rng = stream.state_dict(), rng_state()
        ds = self.ctx.checkpoint_state(ds, rng)  # distributed: every rank's stream state and RNGs
        for r in self.active():
            if r.writes and step >= r.start:
                r.checkpoint(step, tokens, ds, rng)

    def end(self, step: int, tokens: int, stream: DataStream) -> list[str]:
        """Data ran out or a signal came: checkpoint, status, then DataExhausted or SystemExit(128+signum).
        Else the final SAEs; the finished folders (of the whole run, every rank)."""
        if self.exhausted is not None or self.signal is not None:
            self.checkpoint(step, tokens, stream)
            why = "data_exhausted" if self.exhausted is not None else "interrupted"
            for r in self.active():
                if r.writes:
                    write_json(r.dir / STATUS_FILE, {"status": why, "step": step, "tokens": tokens})
            if self.exhausted is not None:
                e = str(self.exhausted)
                raise DataExhausted(message=f"data ran out after {step} of {self.steps} steps ({tokens} tokens){': ' if e else ''}{e}; "
                                    f"checkpoint saved in {self.base}/*/checkpoints/latest")  # fmt: skip
            sig = signal.Signals(self.signal)
            msg = f"{sig.name}: stopped at step {step} of {self.steps}; checkpoint saved, resume with resume=True (demo.py --resume)"
            log.warning(msg)
            print(msg, file=sys.stderr, flush=True)
            raise SystemExit(128 + sig.value)
        for r in self.active():
            if r.writes:
                r.finish(step, tokens, self.massive())
        return self.finished()

    def finished(self) -> list[str]:
        done = [str(r.dir) for r in self.runs if r.writes and r.status().get("status") == "done"]
        return self.ctx.finish(done)
