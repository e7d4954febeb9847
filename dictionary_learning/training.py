"""Training loop: a sweep of JumpReLU trainers on the same activation batches, with run folders,
exact-resume checkpoints, a JSONL log per trainer, optional wandb, and Hub push (see hub.py).

Run folder of one trainer: `{save_dir}/{model}/{site}_layer{L}/{trainer.name}/` holding
  config.json, sae_weights.safetensors, cfg.json   final SAE (trainer.save; norm factor folded in)
  training_log.jsonl                               one JSON line per log step
  status.json (+ FAILED.json on failure)           running / done / failed / data_exhausted / interrupted
  checkpoints/step_XXXXXXXX/                       SAE-only snapshots on a log-spaced schedule
  checkpoints/latest/                              full state: trainer.safetensors, meta.json, data_state.json

Exact resume (checkpoint.py): `latest/` holds model, optimizer, schedules, step, trainer RNG, the
global torch/Python RNGs, log accumulators and the data stream position, so interrupted + resumed ==
uninterrupted (same machine, bitwise on CPU). Data objects with state_dict()/load_state_dict() (ActivationBuffer,
ActivationCache) are restored from their state; plain iterators cannot be, so resume re-creates them
from the start and fast-forwards by skipping the batches already consumed (exact only when the
iterator is deterministic).

Under torchrun (distributed.py) the same loop runs data parallel (every rank trains every SAE on its
share of each batch; rank 0 writes) or with the sweep split across the ranks (each rank trains its
trainers on the all-gathered batch); checkpoints then hold every rank's stream state and RNGs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed, kernels
from .buffer import DataExhausted
from .checkpoint import (
    DataExhaustedError,
    DataStream,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_dir_atomic,
)
from .hub import HubPushError, push_to_hub  # noqa: F401  (re-exported: training.push_to_hub)
from .trainer import JumpReluTrainer, TrainerConfig, estimate_norm_factor
from .utils import LOCK_FILE, atomic_path, git_commit, lock_folder, package_versions, read_json, write_json

log = logging.getLogger(__name__)

LOG_FILE = "training_log.jsonl"
STATUS_FILE = "status.json"
FAILED_FILE = "FAILED.json"
# window means in the log
AVERAGED = (
    "loss",
    "mse",
    "sparsity_loss",
    "l0",
    "frac_variance_explained",
    "frac_variance_explained_centred",
)
LOG_KEYS = {"frac_variance_explained": "fve", "frac_variance_explained_centred": "fve_centred",
            "dead_latents": "dead"}  # update() key -> log key  # fmt: skip


# ---------------------------------------------------------------------------- run folders


def sanitize(name: str) -> str:
    """Model/hook name -> one folder name ('HuggingFaceTB/SmolLM2' -> 'HuggingFaceTB__SmolLM2')."""
    return str(name).strip().replace("/", "__").replace("\\", "__").replace(" ", "_")


def layer_dir(save_dir: str | os.PathLike, run_meta: dict) -> Path:
    """`{save_dir}/{model}/{site}_layer{L}` (site falls back to run_meta['hook'])."""
    for key in ("model", "layer"):
        if key not in run_meta:
            raise ValueError(f"run_meta: missing field {key!r} (needs model, layer, site or hook)")
    site = run_meta.get("site") or run_meta.get("hook")
    if not site:
        raise ValueError("run_meta: missing field 'site' (or 'hook')")
    return Path(save_dir) / sanitize(run_meta["model"]) / f"{sanitize(site)}_layer{int(run_meta['layer'])}"


def log_spaced_steps(steps: int, first: int = 64) -> list[int]:
    """Powers of two from `first` below `steps`: where SAE-only snapshots are kept."""
    out, s = [], first
    while s < steps:
        out.append(s)
        s *= 2
    return out


def _status(path: Path) -> dict:
    f = path / STATUS_FILE
    return read_json(f) if f.exists() else {}


# ---------------------------------------------------------------------------- one trainer's run


@dataclasses.dataclass
class _Run:
    trainer: JumpReluTrainer
    dir: Path
    start: int = 0  # completed steps when this process began
    acc: dict = dataclasses.field(default_factory=dict)  # window sums for the log
    last: dict = dataclasses.field(default_factory=dict)  # last logged line
    active: bool = True
    wandb: object = None
    wandb_id: str | None = None
    cfg: dict = dataclasses.field(default_factory=dict)  # config.json contents
    ckpt_step: int | None = None  # step of checkpoints/latest
    lock: object = None  # utils.lock_folder's file: no second process trains into this folder

    def unlock(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    @property
    def device(self) -> torch.device:
        return next(self.trainer.ae.parameters()).device

    def accumulate(self, out: dict) -> None:
        for k in AVERAGED:
            if k in out:
                self.acc[k] = self.acc.get(k, 0.0) + float(out[k])
        self.acc["n"] = self.acc.get("n", 0) + 1
        self.acc["now"] = {k: float(v) for k, v in out.items() if k not in AVERAGED}

    def log_line(self, step: int, tokens: int) -> dict:
        n = max(self.acc.get("n", 0), 1)
        vals = {**{k: self.acc[k] / n for k in AVERAGED if k in self.acc}, **self.acc.get("now", {})}
        line = {"step": step, "tokens": tokens, **{LOG_KEYS.get(k, k): v for k, v in vals.items()}}
        line.update({f"val_{LOG_KEYS.get(k, k)}": v for k, v in self.acc.get("val", {}).items()})
        with open(self.dir / LOG_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")
        self.acc, self.last = {}, line
        return line


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by a kill: always written after the checkpoint
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in keep))


def _make_trainer(cfg, steps: int):
    if isinstance(cfg, JumpReluTrainer):  # a ready trainer: its schedules must know `steps`
        cfg.cfg.steps = steps
        return cfg
    if isinstance(cfg, dict):
        cfg = TrainerConfig.from_dict(cfg)
    if cfg.steps != steps:
        cfg = dataclasses.replace(cfg, steps=steps)
    return JumpReluTrainer(cfg)


def _feature_density_hist(trainer):
    """wandb.Histogram of log10 firing frequency of each latent over the tokens trained on since the
    last histogram (fired ones only), and the fraction of latents silent in that window."""
    import wandb

    freq = trainer.firing_density()
    return wandb.Histogram(torch.log10(freq[freq > 0]).cpu().numpy()), float((freq == 0).float().mean())


def _fail(run: _Run, step: int, why: str, write: bool = True) -> None:
    """Stop one trainer after a non-finite loss; keep its last good checkpoint."""
    run.active = False
    if not write:  # data-parallel rank > 0: rank 0 writes the same failure
        return
    ck = run.ckpt_step
    msg = f"{run.trainer.name}: non-finite loss at step {step} ({why}); trainer stopped, " + (
        f"last good checkpoint: checkpoints/latest (step {ck})" if ck is not None else "no checkpoint yet"
    )
    log.error(msg)
    info = {"status": "failed", "step": step, "reason": msg, "last_checkpoint_step": ck}
    write_json(run.dir / FAILED_FILE, info)
    write_json(run.dir / STATUS_FILE, info)
    run.unlock()  # this process writes no more to it
    if run.wandb is not None:
        run.wandb.finish(exit_code=1)
        run.wandb = None


def _run_config(trainer, run_meta: dict, norm_factor, schedule: dict) -> dict:
    """Everything needed to reproduce one trainer's run (written to config.json)."""
    asdict = lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)
    meta = json.loads(json.dumps(run_meta, default=asdict))  # BufferConfig etc. -> dicts
    buf = meta.get("buffer") or meta.get("buffer_config") or {}
    return {
        "trainer": trainer.config,
        "model_name": meta["model"],
        "hook_name": meta.get("hook"),
        "layer": meta["layer"],
        "site": meta.get("site"),
        "dataset_path": meta.get("dataset"),
        "context_size": buf.get("ctx_len") if isinstance(buf, dict) else None,
        "prepend_bos": buf.get("prepend_bos") if isinstance(buf, dict) else None,
        "max_norm_multiple": buf.get("max_norm_multiple", meta.get("max_norm_multiple"))
        if isinstance(buf, dict)
        else None,
        "massive_tokens": buf.get("massive_tokens") if isinstance(buf, dict) else None,
        "norm_factor": norm_factor,
        "schedule": schedule,
        "run_meta": meta,
        "versions": package_versions(),
        "cpu_kernels": kernels.describe(trainer.device),
        "git_commit": git_commit(),
    }


def _open_runs(runs: list[_Run], resume: bool, overwrite: bool) -> dict[int, tuple]:
    """Lock, then refuse, clear or resume each run folder; return {run index: checkpoint} for resumed ones.
    On any error the locks taken here are released."""
    try:
        return _open_locked(runs, resume, overwrite)
    except BaseException:
        for run in runs:
            run.unlock()
        raise


def _open_locked(runs: list[_Run], resume: bool, overwrite: bool) -> dict[int, tuple]:
    for run in runs:  # all locks first: fail before touching any folder
        run.lock = lock_folder(run.dir, "run folder (training)")
    ckpts = {}
    for i, run in enumerate(runs):
        status = _status(run.dir).get("status")
        contents = [p for p in run.dir.iterdir() if p.name != LOCK_FILE]
        if contents:
            if overwrite:
                for p in contents:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            elif not resume:
                what = "a finished run" if status == "done" else "an unfinished run"
                raise FileExistsError(
                    f"{run.dir}: holds {what}; pass resume=True to continue it or overwrite=True"
                )
        if resume and status in ("done", "failed"):
            log.info("%s: already %s, skipped", run.dir, status)
            run.active = False
            run.unlock()
        elif resume and (ck := read_checkpoint(run.dir / "checkpoints" / "latest")) is not None:
            ckpts[i] = ck
    return ckpts


def _log_step(runs: list[_Run], step: int, tokens: int, hist: bool) -> list[str]:
    """Write a log line (and wandb point) for every active trainer; return progress-bar snippets."""
    post = []
    for i, r in enumerate(runs):
        if r.active and step > r.start:
            ln = r.log_line(step, tokens)
            val = f" val fve {ln['val_fve']:.3f}" if "val_fve" in ln else ""
            post.append(
                f"{i}: loss {ln['loss']:.3g} L0 {ln['l0']:.1f} fve {ln['fve']:.3f}{val} dead {ln['dead']:.2f}"
            )
            if r.wandb is not None:
                point = {k: v for k, v in ln.items() if k != "step"}
                if hist:
                    point["feature_density_log10"], point["frac_silent_in_window"] = _feature_density_hist(
                        r.trainer
                    )
                r.wandb.log(point, step=step)
    return post


def trainSAE(
    data: Iterable[torch.Tensor],
    trainer_configs: list,
    steps: int,
    save_dir: str | os.PathLike,
    run_meta: dict,
    log_every: int = 100,
    checkpoint_every: int = 1000,
    norm_batches: int = 32,
    snapshot_steps: list[int] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    use_wandb: bool = False,
    wandb_project: str = "sae-factory",
    wandb_entity: str | None = None,
    hist_every: int | None = None,
    validation: torch.Tensor | None = None,
    eval_every: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Train every trainer of a sweep on the same batches x [B, d] drawn once from `data`.

    trainer_configs: TrainerConfig, dicts of its fields, or ready JumpReluTrainer objects; `steps`
    overrides their `steps`. run_meta: model, layer, site (or hook), hook, dataset, buffer (config dict).
    norm_batches: the first batches (at most `steps`) estimate one norm factor sqrt(E||x||^2) for the sweep (then
    are trained on); 0 keeps each config's norm_factor. snapshot_steps: SAE-only snapshots (default
    log_spaced_steps). resume: continue from checkpoints/latest; overwrite: delete existing run folders.
    hist_every: steps between wandb feature-density histograms, each over the tokens since the last
    (default 10 * log_every).
    validation: held-out raw activations [N, d] (e.g. from the validation split); every eval_every steps
    (default log_every) and at the end, each trainer's L0, both FVE definitions and MSE on them go
    into the next log line as val_l0, val_fve, val_fve_centred, val_mse (JSONL, progress bar, wandb).
    Returns the folders of the trainers that finished (failed ones hold FAILED.json).
    Raises DataExhaustedError if the data runs out first, SystemExit(130/143) on SIGINT/SIGTERM (both
    after saving a checkpoint).
    """
    if min(steps, log_every, checkpoint_every) <= 0:
        raise ValueError(
            f"steps, log_every, checkpoint_every must be > 0, got {steps}, {log_every}, {checkpoint_every}"
        )
    if resume and overwrite:
        raise ValueError("pass resume=True or overwrite=True, not both")
    base = layer_dir(save_dir, run_meta)
    ctx = distributed.context()  # torchrun: data-parallel or sweep split (distributed.py); else one process
    configs = [TrainerConfig.from_dict(c) if isinstance(c, dict) else c for c in trainer_configs]
    names = [c.name for c in configs]
    if not configs or len(set(names)) != len(names):
        raise ValueError(
            f"trainer names must be distinct and non-empty, got {names}; vary width/sparsity/lr/seed"
        )
    runs = [_Run(ctx.prepare_trainer(_make_trainer(c, steps)), base / c.name) for c in ctx.share(configs)]
    writes = ctx.writes_files  # data-parallel: rank 0 alone writes folders, logs, checkpoints, wandb
    n_avail = len(data) if hasattr(data, "__len__") else None  # batches, when the data object knows
    if n_avail is not None and n_avail < steps:
        raise ValueError(f"data holds {n_avail} batches but steps={steps}; lower steps or add data")
    norm_batches = min(norm_batches, steps)  # a short run (a small cache) estimates from all its batches
    schedule = dict(
        steps=steps, log_every=log_every, checkpoint_every=checkpoint_every, norm_batches=norm_batches
    )

    ckpts = ctx.open_runs(_open_runs, runs, resume, overwrite)
    prev, bar = {}, None  # signal handlers and progress bar, undone in `finally`
    try:  # from here on the run folders are locked; `finally` unlocks them
        if not ctx.any(any(r.active for r in runs)):
            return ctx.finish([str(r.dir) for r in runs if _status(r.dir).get("status") == "done"])
        stream, tokens = DataStream(data), 0
        here = [ckpts[i][2]["step"] if i in ckpts else 0 for i, r in enumerate(runs) if r.active]
        start, point = ctx.resume_point(min(here, default=None), ckpts)  # least advanced trainer (all ranks)
        if start > 0:  # the stream goes back to the least advanced trainer's position; then the RNGs
            stream.restore(point["data"])
            set_rng_state(point["rng"])
            tokens = point["tokens"]
            log.info("resuming at step %d of %d (%d tokens done)", start, steps, tokens)

        # One norm factor for the sweep (Gemma Scope §3.1) from the first norm_batches, which are then trained on.
        nf = ctx.first(next((ck[2]["norm_factor"] for ck in ckpts.values()), None))
        need = ctx.any(any(r.trainer.cfg.norm_factor is None for r in runs if r.active))
        if nf is None and norm_batches > 0 and need:
            try:
                if ctx.distributed:  # pooled over the ranks' batches
                    nf = ctx.norm_factor(lambda: stream.prefetch(norm_batches))
                else:
                    nf = float(estimate_norm_factor(stream.prefetch(norm_batches)))
            except (StopIteration, DataExhausted) as e:
                raise DataExhaustedError(
                    f"data ran out within the {norm_batches} norm-estimate batches {e}"
                ) from None
            log.info("norm factor %.6g from %d batches (kept for training)", nf, norm_batches)
        for i, run in enumerate(runs):
            if not run.active:
                continue
            run_nf = ckpts[i][2]["norm_factor"] if i in ckpts else run.trainer.cfg.norm_factor or nf
            if run_nf is not None:
                run.trainer.set_norm_factor(run_nf)
            run.cfg = _run_config(run.trainer, run_meta, run_nf, schedule)
            if i in ckpts:
                tensors, tmeta, loop, _ = ckpts[i]
                try:
                    run.trainer.load_state_dict(tensors, tmeta)
                except ValueError as e:
                    raise ValueError(
                        f"{run.dir}: cannot resume: {e}; use the original config or overwrite=True"
                    ) from None
                run.start = run.ckpt_step = loop["step"]
                run.acc, run.last, run.wandb_id = loop["acc"], loop["last"], loop["wandb_id"]
            if not writes:
                continue
            run.dir.mkdir(parents=True, exist_ok=True)
            _truncate_log(run.dir / LOG_FILE, run.start)
            write_json(run.dir / "config.json", run.cfg)
            write_json(run.dir / STATUS_FILE, {"status": "running", "step": run.start})
            if use_wandb:  # one run per trainer, from this process; offline with WANDB_MODE=offline
                import wandb

                run.wandb_id = run.wandb_id or os.urandom(6).hex()
                run.wandb = wandb.init(
                    project=wandb_project, entity=wandb_entity, group=f"{base.parent.name}/{base.name}",
                    name=run.trainer.name, id=run.wandb_id, resume="allow", dir=str(run.dir), config=run.cfg,
                    reinit="create_new",
                )  # fmt: skip

        def checkpoint(step: int) -> None:
            ds, rng = stream.state(), rng_state()
            ds = ctx.checkpoint_state(ds, rng)  # distributed: every rank's stream state and RNGs
            for r in runs:
                if r.active and step >= r.start and writes:
                    r.ckpt_step = step
                    loop = dict(step=step, tokens=tokens, norm_factor=r.cfg["norm_factor"], acc=r.acc, last=r.last,
                                rng=rng, wandb_id=r.wandb_id, trainer_config=r.trainer.config)  # fmt: skip
                    save_checkpoint(r.dir / "checkpoints" / "latest", r.trainer, loop, ds)

        # SIGINT/SIGTERM: finish the step, save a checkpoint, exit 128+signum. A second signal acts at once.
        stop = {"sig": None}

        def on_signal(signum, frame):
            stop["sig"] = signum
            signal.signal(signum, prev[signum])
            log.warning("%s received: saving a checkpoint, then exiting", signal.Signals(signum).name)

        if threading.current_thread() is threading.main_thread():
            prev = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        snaps = set(log_spaced_steps(steps) if snapshot_steps is None else snapshot_steps)
        hist_every = hist_every or 10 * log_every
        eval_every = eval_every or log_every
        t0, tokens0, step, exhausted = time.time(), tokens, start, None
        while step < steps:
            try:  # distributed: all ranks agree on stop / data exhausted; sweep mode: the global batch
                got = ctx.next_batch(stream, stopping=stop["sig"] is not None)
            except (StopIteration, DataExhausted) as e:
                exhausted = e
                break
            if got is None:  # a signal here or on another rank
                stop["sig"] = stop["sig"] or signal.SIGTERM
                break
            x, n_tokens = got  # n_tokens: over all ranks
            if bar is None:
                bar = tqdm(total=steps * n_tokens, initial=tokens, unit="tok", unit_scale=True,
                           disable=not progress or not ctx.is_main, dynamic_ncols=True)  # fmt: skip
            tokens += n_tokens
            on_device = {}
            for r in runs:
                if r.active and step >= r.start:  # a trainer resumed from a later checkpoint waits
                    try:
                        key = str(r.device)
                        if key not in on_device:  # one copy of the batch per device, not per trainer
                            on_device[key] = x.to(r.device)
                        out = r.trainer.update(step, on_device[key])  # raises on a non-finite loss
                    except FloatingPointError as e:
                        _fail(r, step, str(e), write=writes)
                        continue
                    if writes:
                        r.accumulate(out)
            step += 1
            bar.update(n_tokens)
            if validation is not None and writes and (step % eval_every == 0 or step == steps):
                for r in runs:
                    if r.active and step > r.start:
                        r.acc["val"] = r.trainer.validate(validation)
            if not ctx.any(any(r.active for r in runs)):
                raise RuntimeError(
                    f"every trainer failed (non-finite loss) by step {step}; see FAILED.json in {base}"
                )
            if (step % log_every == 0 or step == steps) and writes:
                post = _log_step(runs, step, tokens, hist=step % hist_every == 0)
                rate = (tokens - tokens0) / max(time.time() - t0, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tok/s | " + " | ".join(post))
                (log.debug if progress else log.info)(
                    "step %d/%d %.0f tok/s %s", step, steps, rate, " | ".join(post)
                )
            for r in runs if step in snaps and writes else ():
                if r.active and step > r.start:
                    write_dir_atomic(
                        r.dir / "checkpoints" / f"step_{step:08d}", lambda t, r=r: r.trainer.save(t, r.cfg)
                    )
            if step % checkpoint_every == 0 and step < steps:
                checkpoint(step)

        if exhausted is not None or stop["sig"] is not None:
            checkpoint(step)
            why = "data_exhausted" if exhausted is not None else "interrupted"
            for r in runs:
                if r.active and writes:
                    write_json(r.dir / STATUS_FILE, {"status": why, "step": step, "tokens": tokens})
            if exhausted is not None:
                raise DataExhaustedError(
                    f"data ran out after {step} of {steps} steps ({tokens} tokens){': ' if str(exhausted) else ''}"
                    f"{exhausted}; checkpoint saved in {base}/*/checkpoints/latest"
                )
            sig = signal.Signals(stop["sig"])
            msg = f"{sig.name}: stopped at step {step} of {steps}; checkpoint saved, resume with resume=True (demo.py --resume)"
            log.warning(msg)
            print(msg, file=sys.stderr, flush=True)
            raise SystemExit(128 + sig.value)

        for r in runs:  # final SAEs: written beside, then moved in; status 'done' last
            if r.active and writes:
                tmp = r.dir / f".final.tmp-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                massive = {"massive_tokens": data.massive} if hasattr(data, "massive") else {}  # as applied
                r.trainer.save(tmp, extra_cfg={**r.cfg, "tokens": tokens, **massive})
                for f in tmp.iterdir():
                    os.replace(f, r.dir / f.name)
                tmp.rmdir()
                write_json(r.dir / STATUS_FILE, {**r.last, "status": "done", "step": steps, "tokens": tokens})
        done = ctx.finish([str(r.dir) for r in runs if writes and _status(r.dir).get("status") == "done"])
        return sorted(done, key=lambda p: names.index(Path(p).name))  # sweep order
    finally:
        for r in runs:
            r.unlock()
        for s, h in prev.items():
            if signal.getsignal(s) is on_signal:
                signal.signal(s, h)
        if bar is not None:
            bar.close()
        for r in runs:
            if r.wandb is not None:
                r.wandb.finish(exit_code=0 if _status(r.dir).get("status") == "done" else 1)
