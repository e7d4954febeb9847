"""Test-wide settings: never touch the network, keep wandb offline and quiet."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded SmolLM2-135M as an nnsight model on CPU, fp32 (loaded once per session)."""
    from dictionary_learning.utils import load_language_model

    return load_language_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def one_thread():
    """Use with `pytestmark = pytest.mark.usefixtures("one_thread")`: tiny matmuls run ~30x faster on
    one thread than with torch's thread pool spinning on an oversubscribed shared CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def lock_holder():
    """hold(folder, shared=False): another process takes flock on folder/.lock (as lock_folder does),
    exclusive or shared, and keeps it until the test ends."""
    import subprocess
    import sys

    procs = []
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
            "fcntl.flock(f, fcntl.LOCK_SH if sys.argv[2] == 'shared' else fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(600)")  # fmt: skip

    def hold(folder: Path, shared: bool = False):
        Path(folder).mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-c", code, str(Path(folder) / ".lock"), "shared" if shared else "exclusive"]
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, text=True))
        assert procs[-1].stdout.readline().strip() == "held"
        return procs[-1]

    yield hold
    for p in procs:
        p.kill()
        p.wait()
        p.stdout.close()
