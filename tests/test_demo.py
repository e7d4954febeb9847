"""demo.py end to end on a tiny configuration, plus its plan and its one-line failures."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "dictionary_learning" / "demo.py"


def run_demo(*args, cwd=None, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or REPO,
        timeout=timeout,
    )


def test_plan_for_gemma_needs_no_gpu_or_hub():
    r = run_demo("--preset", "gemma-2-2b", "--plan", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["d_model"] == 2304 and plan["layer"] == 20
    assert plan["steps"] == 23925 and plan["batch_size"] == 2048
    assert len(plan["trainers"]) == 6 and all("w16384" in t for t in plan["trainers"])
    assert plan["output_folder"].endswith("google__gemma-2-2b/resid_post_layer20")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--preset", "nope"], ["unknown preset 'nope'"]),
        (["--set", "bogus=1"], ["unknown field 'bogus'"]),
        (["--layer", "30", "--plan"], ["--layer 30", "0..29"]),
        (["--tokens", "10", "--plan"], ["--tokens 10"]),
        (["--dataset", "no/such-dataset", "--tokens", "2048"], ["no/such-dataset"]),
        (["--push-to-hub", "me/saes", "--tokens", "2048"], ["--push-to-hub me/saes", "offline"]),
    ],
)
def test_bad_settings_fail_with_one_line(args, words, tmp_path):
    r = run_demo(*args, "--save-dir", str(tmp_path), timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("demo.py: error")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0]


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    args = [
        "--layer",
        "3",
        "--ctx-len",
        "64",
        "--tokens",
        "49152",
        "--batch-size",
        "512",
        "--widths",
        "1152",
        "--target-l0s",
        "16,48",
        "--eval-tokens",
        "1024",
        "--save-dir",
        str(tmp_path),
        "--set",
        "warmup_steps=5",
        "--set",
        "sparsity_warmup_steps=30",
        "--set",
        "buffer_tokens=8192",
        "--quiet",
    ]
    r = run_demo(*args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    layer_dir = tmp_path / "smollm2-135m" / "resid_post_layer3"
    trainers = sorted(p for p in layer_dir.iterdir() if p.name.startswith("jumprelu_"))
    assert [p.name for p in trainers] == [
        "jumprelu_w1152_tl0-16_lr0.001_s0",
        "jumprelu_w1152_tl0-48_lr0.001_s0",
    ]
    for folder in trainers:
        for f in (
            "sae_weights.safetensors",
            "config.json",
            "cfg.json",
            "training_log.jsonl",
            "eval_results.json",
            "sparsity.safetensors",
        ):
            assert (folder / f).exists(), folder / f
        res = json.loads((folder / "eval_results.json").read_text())
        assert 1 <= res["l0"] < 1152 / 4  # non-degenerate: far below the width
        assert res["frac_variance_explained"] > 0.3
        assert res["frac_recovered_mean"] > 0.5
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["norm_factor"] > 0 and cfg["run_meta"]["dataset"] == "sample"
    for f in ("eval_summary.csv", "eval_summary.md", "frontier_fve.png", "training_curves.png"):
        assert (layer_dir / f).exists(), f
    assert (layer_dir / "activation_cache" / "manifest.json").exists()
    # the feature browser of the middle target L0 (of 16 and 48: the lower middle, 16) only
    assert (trainers[0] / "features" / "index.html").exists() and not (trainers[1] / "features").exists()
    assert "jumprelu_w1152_tl0-16_lr0.001_s0" in r.stdout  # the summary table

    # a second run must not overwrite the finished folders
    before = (trainers[0] / "sae_weights.safetensors").read_bytes()
    r2 = run_demo(*args)
    assert r2.returncode == 2 and "overwrite" in r2.stderr
    assert (trainers[0] / "sae_weights.safetensors").read_bytes() == before

    # a cache harvested with other settings is never silently reused
    r4 = run_demo(*[a if a != "64" else "32" for a in args])
    assert r4.returncode == 2 and "other settings" in r4.stderr, r4.stderr[-2000:]

    # --from-cache refuses a cache harvested at another layer
    cache = layer_dir / "activation_cache"
    r5 = run_demo(
        "--from-cache", str(cache), "--layer", "4", "--tokens", "2048", "--save-dir", str(tmp_path / "b")
    )
    assert r5.returncode == 2 and "harvested with" in r5.stderr and "'layer': 3" in r5.stderr, r5.stderr[
        -2000:
    ]

    # --eval-only re-evaluates the existing run
    r3 = run_demo("--eval-only", str(layer_dir), "--eval-tokens", "256", "--quiet")
    assert r3.returncode == 0, r3.stderr[-2000:]


# ---------------------------------------------------------------------------- issue 16: in-process checks


@pytest.fixture
def demo_main(monkeypatch, capsys):
    """demo.main(argv) in this process -> (exit code, its 'demo.py: error' lines). Loading a language
    model (the first step of every harvest and evaluation) raises, so a check that passes here ran
    before any harvest."""
    from dictionary_learning import demo, utils

    def no_model(*a, **k):
        raise AssertionError("a language model was loaded: the check came too late")

    monkeypatch.setattr(utils, "load_language_model", no_model)
    monkeypatch.setattr(demo, "evaluate_run", lambda *a: [])  # what these tests check ends before it

    def call(*argv):
        rc = demo.main(list(argv))
        err = capsys.readouterr().err
        return rc, [ln for ln in err.splitlines() if ln.startswith("demo.py: error")]

    return call


@pytest.mark.parametrize(
    "args, words",
    [
        (["--batch-size", "0"], ["--batch-size 0", ">= 1"]),  # defect 9 (was ZeroDivisionError)
        (["--eval-tokens", "0"], ["--eval-tokens 0", ">= 1"]),  # defect 8
        (["--set", "tokens=abc"], ["--set tokens=abc", "an integer"]),  # defect 11
        (["--set", "save_dir=null"], ["--set save_dir=null", "not null"]),  # defect 11
        (["--set", "lrs=notalist"], ["--set lrs=notalist", "a list of numbers"]),  # defect 16
        (["--set", "lrs=0,1e-3"], ["--set lrs=0,1e-3", "> 0"]),
        (["--set", "max_norm_multiple=0.5"], ["--set max_norm_multiple=0.5", "> 1"]),
        (["--set", "cache_activations=maybe"], ["--set cache_activations=maybe", "true or false"]),
        (["--set", "validation_fraction=0"], ["--set validation_fraction=0", "> 0 and < 1"]),
        (["--site", "resid_post", "--set", "site=nowhere"], ["--set site=nowhere", "resid_pre"]),
        (["--push-to-hub", "not a repo id!"], ["--push-to-hub not a repo id!", "not a valid"]),  # defect 8
        (["--push-checkpoints"], ["--push-checkpoints", "--push-to-hub"]),
        (["--resume", "--overwrite"], ["--resume", "--overwrite", "not both"]),
        (["--model", "/nonexistent/model"], ["--model /nonexistent/model", "no such"]),  # defect 17
        (["--dataset", "hub"], ["--dataset sample"]),  # defect 17: not dataset.py's --source
    ],
)
def test_bad_values_fail_with_one_line_before_any_harvest(demo_main, tmp_path, args, words):
    rc, lines = demo_main(*args, "--save-dir", str(tmp_path))
    assert rc == 2 and len(lines) == 1, lines
    for w in words:
        assert w in lines[0], lines[0]
    assert "=True" not in lines[0] and "--source" not in lines[0] and "got 'n'" not in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_set_values_follow_the_field_types():
    """Issue 16, defect 11: `--set` values are parsed by the DemoConfig field's type (was: JSON, so
    widths=5 gave an int where a list belongs, save_dir=null gave None)."""
    from dictionary_learning.demo import build_config, parse_args

    cfg = build_config(parse_args(["--set", "widths=5", "--set", "lrs=1e-3, 3e-4", "--set", "seeds=[0, 1]",
                                   "--set", "sae_autocast=null", "--set", "cache_activations=false",
                                   "--set", "tokens=1e6", "--set", "dataset=my texts.txt",
                                   "--set", "seed=9007199254740993"]))  # fmt: skip
    assert cfg.widths == [5] and cfg.lrs == [1e-3, 3e-4] and cfg.seeds == [0, 1]
    assert cfg.sae_autocast is None and cfg.cache_activations is False
    assert cfg.tokens == 1_000_000 and isinstance(cfg.tokens, int) and cfg.dataset == "my texts.txt"
    assert cfg.seed == 2**53 + 1  # parsed as an int, not through a float


def test_no_gpu_is_said_in_one_line(demo_main, tmp_path, monkeypatch):
    """Issue 16, defect 10: --device cuda without a visible GPU (a 51-line AssertionError before)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, lines = demo_main("--device", "cuda", "--save-dir", str(tmp_path))
    assert rc == 2 and len(lines) == 1
    assert "--device cuda" in lines[0] and "no GPU" in lines[0] and "--device cpu" in lines[0]


def test_cuda_runs_get_expandable_segments_unless_set(monkeypatch):
    """Issue 16, Also: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True by default on CUDA."""
    import torch

    from dictionary_learning import demo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    seen = []
    monkeypatch.setattr(demo, "run", lambda cfg, args: seen.append(os.environ.get("PYTORCH_CUDA_ALLOC_CONF")))
    for env, device, want in [({}, "cuda", "expandable_segments:True"), ({}, "cpu", None),
                              ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}, "cuda", "max_split_size_mb:64"),
                              ({"PYTORCH_ALLOC_CONF": "backend:native"}, "cuda:0", None)]:  # fmt: skip
        for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert demo.main(["--device", device]) == 0
        assert seen.pop() == want, (env, device)


def test_push_without_a_token_fails_before_the_harvest(demo_main, tmp_path, monkeypatch):
    """Issue 16, defect 8: no token is found out before training, not after."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    rc, lines = demo_main("--push-to-hub", "me/saes", "--save-dir", str(tmp_path))
    assert rc == 2 and len(lines) == 1 and "--push-to-hub me/saes" in lines[0] and "token" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_empty_validation_split_fails_before_the_harvest(demo_main, tmp_path):
    """Issue 16, defect 8: a data set whose validation split is empty (one text) failed in the
    evaluation, after training."""
    one = tmp_path / "one.txt"
    one.write_text("A single clinical note about chest pain.\n")
    rc, lines = demo_main("--dataset", str(one), "--save-dir", str(tmp_path / "runs"))
    assert rc == 2 and len(lines) == 1 and f"--dataset {one}" in lines[0] and "validation" in lines[0]
    assert not (tmp_path / "runs").exists()


# --from-cache runs: no language model; activations of SmolLM2's width (576), any values
FROM_CACHE = ["--widths", "64", "--target-l0s", "8", "--set", "warmup_steps=2", "--set",
              "sparsity_warmup_steps=4", "--quiet"]  # fmt: skip


def _cache_and_trainer_dir(tmp_path, n_tokens, argv):
    import torch

    from dictionary_learning import demo
    from dictionary_learning.cache import write_cache

    g = torch.Generator().manual_seed(0)
    write_cache([torch.randn(n_tokens, 576, generator=g)], tmp_path / "cache", n_tokens,
                meta={"layer": 15, "site": "resid_post"})  # fmt: skip
    cfg = demo.build_config(demo.parse_args(argv))
    info = demo.plan(cfg)
    return Path(info["output_folder"]) / info["trainers"][0]


def test_small_cache_run_with_fewer_steps_than_norm_batches(demo_main, tmp_path):
    """Issue 16, defect 7: --tokens 8192 --batch-size 512 (16 steps) from a cache of exactly 8192
    tokens trains (the norm estimate used to want 32 batches and ran out of data)."""
    argv = ["--from-cache", str(tmp_path / "cache"), "--tokens", "8192", "--batch-size", "512",
            *FROM_CACHE, "--save-dir", str(tmp_path / "runs")]  # fmt: skip
    folder = _cache_and_trainer_dir(tmp_path, 8192, argv)
    rc, lines = demo_main(*argv)
    assert rc == 0, lines
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["schedule"]["steps"] == 16 and cfg["schedule"]["norm_batches"] == 16
    assert (folder / "sae_weights.safetensors").exists()


def test_existing_and_damaged_runs_are_refused_in_cli_words(demo_main, tmp_path):
    """Issue 16, defects 17 and 3: the refusal of an existing run speaks --resume / --overwrite (not
    resume=True), and --resume on a damaged checkpoint stops with one line instead of restarting."""
    argv = ["--from-cache", str(tmp_path / "cache"), "--tokens", "2048", "--batch-size", "1024",
            *FROM_CACHE, "--save-dir", str(tmp_path / "runs")]  # fmt: skip
    folder = _cache_and_trainer_dir(tmp_path, 2048, argv)
    latest = folder / "checkpoints" / "latest"
    latest.mkdir(parents=True)
    (latest / "trainer.safetensors").write_bytes(b"\0" * 64)  # meta.json missing
    (folder / "status.json").write_text(json.dumps({"status": "interrupted", "step": 1}))
    rc, lines = demo_main(*argv)
    assert rc == 2 and len(lines) == 1
    assert "--resume" in lines[0] and "--overwrite" in lines[0] and "=True" not in lines[0]
    rc, lines = demo_main(*argv, "--resume")
    assert rc == 2 and len(lines) == 1 and "meta.json" in lines[0] and "--overwrite" in lines[0]
    assert sorted(p.name for p in folder.rglob("*")) == sorted(
        ["checkpoints", "latest", "trainer.safetensors", "status.json", ".lock"]
    )


@pytest.mark.slow
def test_small_run_end_to_end_with_a_harvest_progress_bar(tmp_path, capsys):
    """Issue 16, defect 7 with the real model: --tokens 8192 --batch-size 512 (16 steps, fewer than the
    32 norm batches) harvests, trains and evaluates; the harvest shows a progress bar with tok/s."""
    from dictionary_learning import demo

    rc = demo.main(["--layer", "3", "--ctx-len", "64", "--tokens", "8192", "--batch-size", "512", "--widths",
                    "576", "--target-l0s", "16", "--eval-tokens", "512", "--set", "buffer_tokens=4096",
                    "--set", "warmup_steps=2", "--set", "sparsity_warmup_steps=8", "--save-dir", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert "harvest:" in err and "8.19k/8.19k" in err and "tok/s" in err
    (folder,) = (tmp_path / "smollm2-135m" / "resid_post_layer3").glob("jumprelu_*")
    assert json.loads((folder / "config.json").read_text())["schedule"]["norm_batches"] == 16
    assert json.loads((folder / "eval_results.json").read_text())["l0"] > 0


def test_a_run_folder_in_use_is_refused_before_its_cache_is_touched(demo_main, tmp_path, lock_holder):
    """Issue 16, defect 1: while another process uses the run folder (holds its lock), demo.py
    --overwrite with other harvest settings is refused in one line naming the folder, before it loads a
    model or touches anything (it used to delete activation_cache/ first)."""
    from dictionary_learning import demo
    from dictionary_learning.cache import write_cache

    argv = ["--tokens", "4096", "--save-dir", str(tmp_path)]
    layer = Path(demo.plan(demo.build_config(demo.parse_args(argv)))["output_folder"])
    write_cache([torch.ones(64, 576)], layer / "activation_cache", 64, meta={"harvest_key": {"other": 1}})
    before = {p.name: p.read_bytes() for p in (layer / "activation_cache").iterdir()}
    lock_holder(layer)  # the other run
    rc, lines = demo_main(*argv, "--overwrite")
    assert rc == 2 and lines == [
        f"demo.py: error: {layer}: another process is using this run folder; wait for it or stop it"
    ]
    assert {p.name: p.read_bytes() for p in (layer / "activation_cache").iterdir()} == before
    assert sorted(p.name for p in layer.iterdir()) == [".lock", "activation_cache"]


def test_disk_full_in_a_checkpoint_is_one_line_and_marks_the_run_failed(demo_main, tmp_path, monkeypatch):
    """Issue 16, defect 12: demo.py reports a full disk as "no space left on device: PATH" in one line
    (exit 2; was a SafetensorError traceback), and status.json says failed (was "running")."""
    from safetensors import SafetensorError

    from dictionary_learning import checkpoint

    def full_disk(tensors, path, *a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    argv = ["--from-cache", str(tmp_path / "cache"), "--tokens", "8192", "--batch-size", "512",
            *FROM_CACHE, "--save-dir", str(tmp_path / "runs")]  # fmt: skip
    folder = _cache_and_trainer_dir(tmp_path, 8192, argv)
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    rc, lines = demo_main(*argv)
    latest = folder / "checkpoints" / "latest"
    assert rc == 2 and lines == [f"demo.py: error: no space left on device: {latest}"]
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "failed" and status["reason"] == f"no space left on device: {latest}"
    assert not list(folder.rglob("*.tmp-*"))


# the first run waits (before its second batch from the cache) until the file `go` appears in its gate
GATED_RUN = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from dictionary_learning import cache, demo
gate, read = Path(sys.argv[2]), cache.ActivationCache.__next__
def gated(self):
    if self.batches_yielded == 1:
        (gate / "training").touch()
        while not (gate / "go").exists():
            time.sleep(0.05)
    return read(self)
cache.ActivationCache.__next__ = gated
raise SystemExit(demo.main(sys.argv[3:]))
"""
TINY = ["--layer", "1", "--ctx-len", "32", "--batch-size", "256", "--widths", "64", "--target-l0s", "8",
        "--eval-tokens", "256", "--set", "buffer_tokens=1024", "--set", "warmup_steps=2", "--set",
        "sparsity_warmup_steps=4", "--no-features", "--quiet"]  # fmt: skip


@pytest.mark.slow
def test_second_run_is_refused_while_the_first_trains_from_its_cache(tmp_path):
    """Issue 16, defect 1 ("Done when"): a demo.py run harvests its cache and trains from it; while it
    trains, a second demo.py --overwrite into the same folder (other settings: it would re-harvest) is
    refused in one line, exit 2, naming the folder and "another process", and changes nothing; the
    first finishes with weights bitwise equal to an undisturbed run's."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")

    def start(name, go):
        gate = tmp_path / f"{name}_gate"
        gate.mkdir()
        if go:
            (gate / "go").touch()
        argv = [*TINY, "--tokens", "2048", "--save-dir", str(tmp_path / name)]
        cmd = [sys.executable, "-c", GATED_RUN, str(REPO), str(gate), *argv]
        return gate, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    _, ref = start("undisturbed", go=True)
    gate, first = start("run", go=False)
    layer = tmp_path / "run" / "smollm2-135m" / "resid_post_layer1"
    try:
        t0 = time.time()
        while not (gate / "training").exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() - t0 < 300, "the first run did not start training"
            time.sleep(0.1)
        cache_before = {p.name: p.read_bytes() for p in (layer / "activation_cache").iterdir()}
        second = run_demo(*TINY, "--tokens", "4096", "--save-dir", str(tmp_path / "run"), "--overwrite",
                          timeout=300)  # fmt: skip
        assert first.poll() is None  # still waiting at its gate: the second ran while it trained
    finally:
        (gate / "go").touch()
    out = {name: p.communicate(timeout=300) for name, p in (("first", first), ("ref", ref))}
    assert first.returncode == 0, out["first"][1][-3000:]
    assert ref.returncode == 0, out["ref"][1][-3000:]
    lines = [ln for ln in second.stderr.splitlines() if ln.startswith("demo.py: error")]
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert lines == [
        f"demo.py: error: {layer}: another process is using this run folder; wait for it or stop it"
    ]
    assert {p.name: p.read_bytes() for p in (layer / "activation_cache").iterdir()} == cache_before
    name = "jumprelu_w64_tl0-8_lr0.001_s0"
    got = load_file(layer / name / "sae_weights.safetensors")
    want = load_file(
        tmp_path / "undisturbed" / "smollm2-135m" / "resid_post_layer1" / name / "sae_weights.safetensors"
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_eval_only_waits_for_no_run_and_is_refused_while_one_holds_the_folder(
    demo_main, lock_holder, tmp_path
):
    """--eval-only writes eval_results.json into the trainer folders: not while a demo run (its lock,
    exclusive) or a sweep (shared) uses the folder; refused in one line before any model loads."""
    folder = tmp_path / "runs" / "m" / "resid_post_layer3"
    for shared in (False, True):
        holder = lock_holder(folder, shared=shared)
        rc, errors = demo_main("--eval-only", str(folder))
        assert rc == 2 and len(errors) == 1 and str(folder) in errors[0], errors
        holder.kill()
        holder.wait()
    rc, errors = demo_main("--eval-only", str(folder))
    assert rc == 0 and errors == []
