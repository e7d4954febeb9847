"""Training loop: a sweep of JumpReLU trainers on the same activation batches, with run folders,
exact-resume checkpoints, a JSONL log per trainer, optional wandb (runs.py holds the folders' bookkeeping).

Exact resume (checkpoint.py): checkpoints/latest/ holds model, optimizer, schedules, step, trainer RNG, the
global torch/Python RNGs, log accumulators and the data stream position, so interrupted + resumed ==
uninterrupted (same machine, bitwise on CPU). Data objects with state_dict()/load_state_dict()
(ActivationBuffer, ActivationCache) are restored from their state; plain iterators cannot be, so resume
re-creates them from the start and fast-forwards by skipping the batches already consumed (exact only
when the iterator is deterministic).

Under torchrun (distributed.py) the same loop runs data parallel (every rank trains every SAE on its
share of each batch; rank 0 writes) or with the sweep split across the ranks (each rank trains its
trainers on the all-gathered batch); checkpoints then hold every rank's stream state and RNGs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from . import distributed
from .config import TrainerConfig
from .runs import RunFolder, Sweep
from .trainer import JumpReluTrainer
from .utils import git_commit, lock_folder, package_versions


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


_HELD: dict[Path, list] = {}  # layer folder -> [lock file or None, nested holds] of this process


@contextlib.contextmanager
def hold_run_folder(base: Path, shared: bool = False):
    """The lock on a run's layer folder `base` (utils.lock_folder: flock on base/.lock) for a `with`
    block. demo.run holds it exclusively from before its first write (the activation cache) to its end
    (evaluation, feature browser, push); trainSAE holds it shared: sweeps of other trainers may train
    into one layer folder at once (each trainer folder has its own exclusive lock), a demo.py run may
    not. Re-entrant within this process: a nested hold (trainSAE inside demo.run) is granted at once,
    and the lock is dropped when the outermost hold ends. Under torchrun rank 0 holds it; a refusal
    there (FolderLockedError) stops every rank."""
    ctx, key = distributed.context(), Path(base).absolute()

    def take():
        if ctx.is_main:
            if key not in _HELD:
                _HELD[key] = [lock_folder(key, "run folder", shared), 0]
            _HELD[key][1] += 1

    ctx.agree(take)
    try:
        yield
    finally:
        if ctx.is_main:
            _HELD[key][1] -= 1
            if _HELD[key][1] == 0 and (fh := _HELD.pop(key)[0]) is not None:
                fh.close()


def log_spaced_steps(steps: int, first: int = 64) -> list[int]:
    """Powers of two from `first` below `steps`: where SAE-only snapshots are kept."""
    out, s = [], first
    while s < steps:
        out.append(s)
        s *= 2
    return out


def run_config(trainer: JumpReluTrainer, run_meta: dict, norm_factor: float | None, schedule: dict) -> dict:
    """Everything needed to reproduce one trainer's run (written to its config.json)."""
    asdict = lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)
    meta = json.loads(json.dumps(run_meta, default=asdict))  # BufferConfig etc. -> dicts
    buf = meta.get("buffer") or meta.get("buffer_config") or {}
    buf = buf if isinstance(buf, dict) else {}
    cfg = {
        "trainer": trainer.cfg.to_dict(),
        "model_name": meta["model"],
        "hook_name": meta.get("hook"),
        "layer": meta["layer"],
        "site": meta.get("site"),
        "dataset_path": meta.get("dataset"),
        "context_size": buf.get("ctx_len"),
        "prepend_bos": buf.get("prepend_bos"),
        "max_norm_multiple": buf.get("max_norm_multiple", meta.get("max_norm_multiple")),
        "massive_tokens": buf.pop("massive_tokens", None),  # here only (updated as the data is read)
        "norm_factor": norm_factor,
        "schedule": schedule,
        "run_meta": meta,
        "versions": package_versions(),
        "git_commit": git_commit(),
    }
    if "max_norm_multiple" not in buf and "max_norm_multiple" not in meta:
        del cfg["max_norm_multiple"]  # unknown: a recorded None would mean "no massive-token rule"
    return cfg


def _trainer(cfg, steps: int) -> JumpReluTrainer:
    """A trainer for a TrainerConfig, a dict of its fields, or a ready trainer; its schedules know `steps`."""
    if isinstance(cfg, JumpReluTrainer):
        cfg.cfg.steps = steps
        return cfg
    cfg = TrainerConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
    return JumpReluTrainer(cfg if cfg.steps == steps else cfg.replace(steps=steps))


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
    norm_batches: the first batches (at most `steps`) estimate one norm factor sqrt(E||x||^2) for the whole
    sweep (then are trained on); 0 keeps each config's norm_factor. snapshot_steps: SAE-only snapshots (default
    log_spaced_steps). resume: continue from checkpoints/latest; overwrite: delete existing run folders.
    hist_every: steps between wandb feature-density histograms (default 10 * log_every). validation:
    held-out raw activations [N, d]; every eval_every steps (default log_every) and at the end, each
    trainer's L0, both FVEs and MSE on them go into the next log line (val_l0, val_fve, val_fve_centred,
    val_mse). Returns the folders of the trainers that finished (failed ones hold FAILED.json). Raises
    DataExhausted if the data runs out first, SystemExit(130/143) on SIGINT/SIGTERM (both after saving
    a checkpoint), FolderLockedError if another process uses a folder (the layer folder is held shared,
    hold_run_folder, each trainer folder exclusively), NoSpaceError (an OSError naming the file) when
    the disk fills; an error marks the running trainers failed in status.json."""
    if min(steps, log_every, checkpoint_every) <= 0:
        raise ValueError(f"steps, log_every, checkpoint_every must be > 0, got {steps}, {log_every}, {checkpoint_every}")  # fmt: skip
    if resume and overwrite:
        raise ValueError("pass resume=True or overwrite=True, not both")
    names = [(TrainerConfig.from_dict(c) if isinstance(c, dict) else c).name for c in trainer_configs]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"trainer names must be distinct and non-empty, got {names}; vary width/sparsity/lr/seed")  # fmt: skip
    if hasattr(data, "__len__") and len(data) < steps:
        raise ValueError(f"data holds {len(data)} batches but steps={steps}; lower steps or add data")
    norm_batches = min(norm_batches, steps)  # a short run (a small cache) estimates from all its batches
    ctx, base = distributed.context(), layer_dir(save_dir, run_meta)  # torchrun: data parallel or sweep split
    runs = [RunFolder(ctx.prepare_trainer(_trainer(c, steps)), base / n, ctx.writes_files)
            for c, n in ctx.share(list(zip(trainer_configs, names)))]  # fmt: skip
    schedule = dict(steps=steps, log_every=log_every, checkpoint_every=checkpoint_every, norm_batches=norm_batches)  # fmt: skip
    wandb_kw = dict(project=wandb_project, entity=wandb_entity, group=f"{base.parent.name}/{base.name}")
    snaps = set(log_spaced_steps(steps) if snapshot_steps is None else snapshot_steps)
    hist_every, eval_every = hist_every or 10 * log_every, eval_every or log_every
    with hold_run_folder(base, shared=True), Sweep(runs, ctx, base, steps, progress) as sweep:
        stream, step, tokens = sweep.open(data, resume, overwrite)  # locked; refused, cleared or resumed
        if not ctx.any(bool(sweep.active())):
            return sorted(sweep.finished(), key=lambda p: names.index(Path(p).name))
        nf = sweep.norm_factor(stream, norm_batches)
        sweep.begin(lambda t, f: run_config(t, run_meta, f, schedule), nf, wandb_kw if use_wandb else None)
        while step < steps:
            got = sweep.next_batch(stream, tokens)  # None: the data ran out, or a stop signal
            if got is None:
                break
            x, n_tokens = got  # n_tokens: over all ranks
            sweep.update(step, x, n_tokens)  # a non-finite loss or gradient stops that trainer alone
            step, tokens = step + 1, tokens + n_tokens
            if validation is not None and (step % eval_every == 0 or step == steps):
                sweep.validate(validation, step)
            if step % log_every == 0 or step == steps:
                sweep.log(step, tokens, hist=step % hist_every == 0)
            if step in snaps:
                sweep.snapshot(step)
            if step % checkpoint_every == 0 and step < steps:
                sweep.checkpoint(step, tokens, stream)
        done = sweep.end(step, tokens, stream)  # early end: checkpoint, then raise
    return sorted(done, key=lambda p: names.index(Path(p).name))  # sweep order
