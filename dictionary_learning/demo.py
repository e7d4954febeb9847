"""Harvest activations, train a sweep of JumpReLU SAEs, evaluate them, save and optionally push.

    python dictionary_learning/demo.py                         # embedded SmolLM2-135M on the sample, CPU
    python dictionary_learning/demo.py --preset gemma-2-2b     # the original recipe (GPU, Hub)
    python dictionary_learning/demo.py --preset gemma-2-2b --plan   # what would run, without running it
    torchrun --nproc_per_node 4 dictionary_learning/demo.py ...     # 4 GPUs, data parallel (distributed.py)

Stages: data (dataset.load_texts, train and validation splits) -> activations (buffer.ActivationBuffer,
optionally written once to an on-disk cache.ActivationCache) -> training (training.trainSAE, one
harvest for the whole sweep) -> evaluation (eval_report on the held-out split) -> Hub push.
Presets live in demo_config.py; every DemoConfig field can be overridden from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dictionary_learning.demo_config import (
    DEFAULT_PRESET,
    PRESETS,
    DemoConfig,
    UsageError,
    get_preset,
    parse_value,
    problems,
)
from dictionary_learning.demo_data import activations, validation_activations
from dictionary_learning.demo_plan import plan, run_meta, sweep
from dictionary_learning.utils import first_line

log = logging.getLogger("demo")

# ---------------------------------------------------------------------------- command line


def _list(kind):
    return lambda s: [kind(v) for v in s.replace(",", " ").split()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"one of {', '.join(PRESETS)}")
    o = p.add_argument_group("overrides of the preset's fields (demo_config.DemoConfig)")
    o.add_argument("--model", help="embedded name, local folder or Hub id")
    o.add_argument("--layer", type=int)
    o.add_argument("--site", choices=["resid_post", "resid_pre", "mlp_out"])
    o.add_argument("--dataset", help="'sample', 'hub', a local folder/file, or a Hub dataset id")
    o.add_argument("--tokens", type=int, help="training tokens per trainer")
    o.add_argument("--ctx-len", type=int)
    o.add_argument("--batch-size", dest="batch_size", type=int, help="SAE batch (activation vectors)")
    o.add_argument("--lm-batch-size", type=int, help="contexts per LM forward")
    o.add_argument("--dict-size", "--widths", dest="widths", type=_list(int), help="e.g. 4608 or 2304,4608")
    o.add_argument("--target-l0s", type=_list(float), help="e.g. 20,40,80")
    o.add_argument("--sparsity-coeffs", type=_list(float))
    o.add_argument("--sparsity-mode", choices=["target_l0", "l0", "tanh"])
    o.add_argument("--lrs", type=_list(float))
    o.add_argument("--seeds", type=_list(int))
    o.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU where present)")
    o.add_argument("--dtype", help="language-model dtype: float32, bfloat16, float16")
    o.add_argument("--eval-tokens", type=int)
    o.add_argument("--save-dir")
    o.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any DemoConfig field, e.g. --set warmup_steps=500 (repeatable)",
    )
    p.add_argument(
        "--cache-activations",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="harvest once into an on-disk activation cache, train from it",
    )
    p.add_argument("--from-cache", metavar="DIR_OR_REPO", help="train from an existing activation cache")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="push the trained SAEs to this Hub model repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    p.add_argument("--push-checkpoints", action="store_true",
                   help="with --push-to-hub: also push the SAE snapshots checkpoints/step_*/")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace existing run folders")
    p.add_argument("--eval-only", metavar="RUN_DIR", help="only evaluate the SAEs under RUN_DIR")
    p.add_argument("--plan", action="store_true", help="print what would run, then exit")
    p.add_argument("--features", choices=["middle", "all"], default="middle",
                   help="feature browser (features.py) of the SAE with the middle target L0, or of all")  # fmt: skip
    p.add_argument("--no-features", dest="features", action="store_const", const=None, help="no feature browser")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    d = p.add_argument_group("under torchrun (distributed.py)")
    d.add_argument("--distributed-mode", choices=["data", "sweep"], default="data",
                   help="data: every rank trains every SAE on its data shard, gradients all-reduced; "
                   "sweep: the sweep's trainers are split across the ranks (default: data)")  # fmt: skip
    d.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help="a rank waiting longer for a silent peer fails (default $SAE_DIST_TIMEOUT or 1800)")  # fmt: skip
    return p.parse_args(argv)


def _flag(name: str, value) -> str:
    """How a DemoConfig field is given on the command line: '--batch-size 0', '--widths 4608,9216'."""
    flag = "--" + name.replace("_", "-")
    return f"{flag} {','.join(map(str, value)) if isinstance(value, list) else value}"


def build_config(args) -> DemoConfig:
    """The preset with the command-line overrides applied; unknown presets/fields, values of the wrong
    type (--set values are parsed by the field's type) or out of range -> UsageError naming the flag."""
    try:
        cfg = get_preset(args.preset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    fields = {f.name: f for f in dataclasses.fields(DemoConfig)}
    given = {}  # field -> the flag that set it, for the messages
    for name in fields:
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, value)
            given[name] = _flag(name, value)
    if args.cache_activations is not None:
        cfg.cache_activations = args.cache_activations
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise UsageError(f"--set {item!r}: unknown field {key!r}; fields: {', '.join(fields)}")
        try:
            setattr(cfg, key, parse_value(key, raw))
        except ValueError as e:
            raise UsageError(f"--set {e}") from None
        given[key] = f"--set {item}"
    for name, why in problems(cfg):
        where = given.get(name) or f"preset {args.preset!r}: {name}={getattr(cfg, name)!r}"
        raise UsageError(f"{where}: {why}")
    if cfg.tokens < cfg.batch_size:
        raise UsageError(f"--tokens {cfg.tokens} is less than one SAE batch ({cfg.batch_size})")
    return cfg


# ---------------------------------------------------------------------------- the run


def evaluate_run(run_dir: Path, cfg: DemoConfig, args) -> list[dict]:
    """Evaluate every SAE under run_dir on the held-out split; returns their eval_results."""
    from dictionary_learning import eval_report
    from dictionary_learning.eval_summary import find_saes

    argv = [str(run_dir), "--n-tokens", str(cfg.eval_tokens), "--dtype", cfg.dtype]
    if cfg.device:
        argv += ["--device", cfg.device]
    if args.quiet:
        argv.append("--no-progress")
    if eval_report.main(argv) != 0:
        raise RuntimeError(f"evaluation of {run_dir} failed (see the messages above)")
    return [
        {"folder": str(p), **json.loads((p / "eval_results.json").read_text())} for p in find_saes(run_dir)
    ]


def print_summary(rows: list[dict]) -> None:
    """The headline table: FVE in both definitions (standard = SAELens/SAEBench, centred =
    dictionary_learning), delta loss and loss recovered vs mean ablation, with 95% intervals."""
    num = lambda v: "n/a" if v is None else f"{v:.3f}"
    ci = lambda r, k: (
        num(r.get(k)) + (" [{}, {}]".format(*map(num, r[k + "_ci"])) if r.get(k + "_ci") else "")
    )
    print(f"\n{'width':>7} {'L0':>7} {'FVE standard [95%]':>24} {'FVE centred':>11} {'delta loss':>10} "
          f"{'loss rec. mean abl. [95%]':>26} {'massive':>8}  folder")  # fmt: skip
    for r in rows:
        width = r.get("dict_size") or r.get("d_sae") or "?"
        massive = (r.get("massive_tokens") or {}).get("share_dropped", 0.0)
        print(f"{width:>7} {r['l0']:7.1f} {ci(r, 'frac_variance_explained'):>24} "
              f"{num(r.get('frac_variance_explained_centred')):>11} {num(r.get('delta_loss')):>10} "
              f"{ci(r, 'frac_recovered_mean'):>26} {massive:8.2%}  {r['folder']}")  # fmt: skip


def preflight(cfg: DemoConfig, args) -> None:
    """What can be checked before any data, model or folder is touched: flag clashes, the device
    (and the CUDA allocator setting), the Hub push (repo id, online, token)."""
    from dictionary_learning.hub import HubPushError, check_push
    from dictionary_learning.utils import check_device, cuda_alloc_conf

    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite: pass one, not both")
    if args.push_checkpoints and not args.push_to_hub:
        raise UsageError("--push-checkpoints needs --push-to-hub REPO_ID")
    try:
        cfg.device = check_device(cfg.device)
    except ValueError as e:
        raise UsageError(f"--device {cfg.device}: {e}; pick the CPU with --device cpu") from None
    cuda_alloc_conf(cfg.device)  # expandable_segments:True unless set; before the first CUDA allocation
    if args.push_to_hub:  # fail before hours of training, not after
        try:
            check_push(args.push_to_hub)
        except HubPushError as e:
            raise UsageError(f"--push-to-hub {args.push_to_hub}: {e}") from None


def check_splits(cfg: DemoConfig, train_texts: list[str], need_train: bool) -> None:
    """The evaluation reads the held-out split: an empty one fails now, not after training."""
    from dataset import load_texts

    if need_train and not train_texts:
        raise UsageError(f"--dataset {cfg.dataset}: its train split is empty")
    if not load_texts(cfg.dataset, "validation", seed=cfg.seed, validation_fraction=cfg.validation_fraction):
        raise UsageError(
            f"--dataset {cfg.dataset}: its validation split is empty (the evaluation's held-out text; "
            f"validation_fraction {cfg.validation_fraction}): add texts, or --set validation_fraction=..."
        )


# the library's words for what the user typed as flags
CLI_WORDS = {"resume=True": "--resume", "overwrite=True": "--overwrite"}


def cli_words(msg: str) -> str:
    for api, flag in CLI_WORDS.items():
        msg = msg.replace(api, flag)
    return msg


def run(cfg: DemoConfig, args) -> list[dict] | None:
    """The whole run; the run folder stays locked from before its first write to the end (_run). Returns
    the eval results of this sweep's SAEs (the folder's summary covers every SAE in it), None on ranks > 0."""
    with contextlib.ExitStack() as held:
        return _run(cfg, args, held)


def _run(cfg: DemoConfig, args, held: contextlib.ExitStack) -> list[dict] | None:
    from dataset import load_texts
    from dictionary_learning import distributed
    from dictionary_learning.training import hold_run_folder, layer_dir, trainSAE
    from dictionary_learning.utils import default_device, load_language_model, write_json

    cfg.device = cfg.device or default_device()
    ctx = distributed.init(args.distributed_mode, device=cfg.device, timeout_s=args.dist_timeout)  # torchrun
    cfg.device = ctx.pin_device(cfg.device)  # cuda -> cuda:{LOCAL_RANK}
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    info = plan(cfg)
    steps = info["steps"]
    out_dir = layer_dir(cfg.save_dir, run_meta(cfg))
    t0 = time.time()
    train_texts = []  # --from-cache: the activations are given
    if not args.from_cache:
        train_texts = load_texts(
            cfg.dataset, "train", seed=cfg.seed, validation_fraction=cfg.validation_fraction
        )
    check_splits(cfg, train_texts, need_train=not args.from_cache)
    train_texts = distributed.shard(train_texts)  # texts i with i % world_size == rank
    # from here to the end of run() the run folder (cache, trainers, summaries) is this run's: a
    # process using it already makes this one stop now, before anything in it is written
    held.enter_context(hold_run_folder(out_dir))
    model = None
    if not args.from_cache:
        model = load_language_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    data, buffer_cfg = activations(cfg, args, model, train_texts, steps, out_dir)
    times = {"data_and_activations_s": time.time() - t0}  # loading, and the harvest into a cache
    val_texts = None if args.from_cache else load_texts(cfg.dataset, "validation", seed=cfg.seed,
                                                        validation_fraction=cfg.validation_fraction)  # fmt: skip
    validation = validation_activations(cfg, model, val_texts) if ctx.is_main else None
    trainers = sweep(cfg, info["d_model"], steps)
    log_every = max(1, min(100, steps // 20))
    trainSAE(
        data,
        trainers,
        steps,
        cfg.save_dir,
        run_meta(cfg, buffer_cfg),
        log_every=log_every,
        checkpoint_every=max(log_every, min(1000, steps // 4)),
        resume=args.resume or distributed.restart_count() > 0,  # torchrun --max-restarts resumes
        overwrite=args.overwrite,
        use_wandb=args.wandb,
        validation=validation,
        eval_every=cfg.eval_every or max(1, steps // 10),
        progress=not args.quiet,
    )
    del model, data
    distributed.shutdown()
    if not ctx.is_main:  # rank 0 evaluates and pushes every trainer
        return None
    times["training_s"] = time.time() - t0 - sum(times.values())  # (streaming: harvest included)
    log.info("training done in %.0f s", time.time() - t0)
    names = {t.name for t in trainers}  # the folder may also hold other sweeps' SAEs (in its summary)
    rows = [r for r in evaluate_run(out_dir, cfg, args) if Path(r["folder"]).name in names]
    times["evaluation_s"] = time.time() - t0 - sum(times.values())
    if args.features:  # <trainer>/features/index.html
        from dictionary_learning import features

        flags = ["--dtype", cfg.dtype, *(["--device", cfg.device] if cfg.device else [])]
        flags += ["--no-progress"] * args.quiet + ["--overwrite"] * args.overwrite
        features.build_for_run([Path(r["folder"]) for r in rows], args.features, flags)
    times["features_s"] = time.time() - t0 - sum(times.values())
    write_json(out_dir / "demo_config.json", cfg.to_dict())
    write_json(out_dir / "timings.json", {**times, "total_s": time.time() - t0})
    if args.push_to_hub:
        from dictionary_learning.hub import push_to_hub

        push_to_hub(out_dir, args.push_to_hub, private=args.private, checkpoints=args.push_checkpoints)
    log.info("all stages done in %.0f s", time.time() - t0)
    return rows


def main(argv=None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    args = parse_args(argv)
    try:
        cfg = build_config(args)
        if args.plan:
            print(json.dumps(plan(cfg), indent=2))
            return 0
        preflight(cfg, args)
        if args.eval_only:  # not while a run trains or evaluates there (its lock)
            from dictionary_learning.training import hold_run_folder

            with hold_run_folder(Path(args.eval_only)):
                print_summary(evaluate_run(Path(args.eval_only), cfg, args))
            return 0
        rows = run(cfg, args)
        if rows is not None:
            print_summary(rows)
        return 0
    except UsageError as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as e:  # data, files, Hub, data exhausted, distributed
        msg = cli_words(first_line(e))
        log.debug("traceback", exc_info=True)
        print(f"demo.py: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo.py: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
