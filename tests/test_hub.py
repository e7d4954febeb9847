"""Hub push over huggingface_hub's own client with an in-process mock transport (never the real Hub)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub.utils._http import default_client_factory

from dictionary_learning.config import TrainerConfig
from dictionary_learning.eval_summary import find_saes
from dictionary_learning.hub import HubPushError, check_push, main, push_to_hub
from dictionary_learning.training import layer_dir, trainSAE

REPO = "someone/tiny-saes"
META = {"model": "smollm2-135m", "layer": 2, "site": "resid_post", "hook": "blocks.2.hook_resid_post",
        "dataset": "sample", "buffer": {"ctx_len": 8}}  # fmt: skip


def batches(n=40, d=16, b=32):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        yield torch.randn(b, d, generator=g) + 1.0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A layer folder with two finished trainers (one with eval_results.json; both with SAE snapshots
    at steps 8 and 16) and one failed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps on 2 shared cores: a spinning thread pool is 50x slower
    save = tmp_path_factory.mktemp("runs")
    cfgs = [TrainerConfig(16, m, lr=1e-3, target_l0=4, warmup_steps=2, sparsity_warmup_steps=5, device="cpu")
            for m in (32, 64)]  # fmt: skip
    out = trainSAE(batches(), cfgs, 20, save, META, log_every=5, checkpoint_every=10, norm_batches=4,
                   snapshot_steps=[8, 16], progress=False)  # fmt: skip
    torch.set_num_threads(threads)
    (Path(out[0]) / "eval_results.json").write_text(json.dumps({"l0": 3.5, "frac_variance_explained": 0.71,
                                                                 "frac_recovered": 0.9321, "delta_loss": 0.2468,
                                                                 "frac_recovered_mean": 0.8642}))  # fmt: skip
    failed = Path(out[0]).parent / "jumprelu_w99_failed"
    failed.mkdir()
    (failed / "FAILED.json").write_text("{}")
    return layer_dir(save, META)


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


class MockHub:
    """Records requests; answers like the Hub, or with `fail` = {path suffix: status}."""

    def __init__(self, fail=None):
        self.requests, self.fail = [], fail or {}

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path, request.headers.get("authorization"), request.read()))
        for suffix, status in self.fail.items():
            if path.endswith(suffix):
                return httpx2.Response(status, json={"error": f"mock {status}"})
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{REPO}"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if path == f"/api/models/{REPO}/preupload/main":
            files = json.loads(request.read())["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for f in files]})  # fmt: skip
        if path == f"/api/models/{REPO}/commit/main":
            return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{REPO}/commit/abc",
                                              "commitOid": "a" * 40})  # fmt: skip
        return httpx2.Response(404, json={"error": f"mock: no route {path}"})

    def committed_files(self) -> dict[str, bytes]:
        (body,) = [b for m, p, _, b in self.requests if p.endswith("/commit/main")]
        items = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        return {
            it["value"]["path"]: base64.b64decode(it["value"]["content"])
            for it in items
            if it["key"] == "file"
        }


@pytest.fixture
def mock_hub(monkeypatch):
    """Online mode for the duration, with every request going to a MockHub; default client restored."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hubs = []

    def install(fail=None):
        hub = MockHub(fail)
        huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
        hubs.append(hub)
        return hub

    yield install
    huggingface_hub.set_client_factory(default_client_factory)
    huggingface_hub.close_session()


def test_push_uploads_trainer_folders_and_card(run_dir, mock_hub):
    hub = mock_hub()
    before = tree_hash(run_dir)
    url = push_to_hub(run_dir, REPO, token="hf_test_token")
    assert url.endswith("/commit/abc")
    assert tree_hash(run_dir) == before  # nothing written locally (no README in the run folder)
    api = [(m, p, a) for m, p, a, _ in hub.requests if p != "/api/agent-harnesses"]  # hf's own telemetry
    assert {p for _, p, _ in api} == {"/api/repos/create", "/api/validate-yaml", f"/api/models/{REPO}/preupload/main",
                                      f"/api/models/{REPO}/commit/main"}  # fmt: skip
    assert all(a == "Bearer hf_test_token" for _, _, a in api)
    create = [json.loads(b) for m, p, _, b in hub.requests if p == "/api/repos/create"]
    assert create and create[0]["name"] == "tiny-saes" and create[0]["organization"] == "someone"
    files = hub.committed_files()
    names = sorted(d.name for d in find_saes(run_dir, finished=True))
    assert names == ["jumprelu_w32_tl0-4_lr0.001_s0", "jumprelu_w64_tl0-4_lr0.001_s0"]
    want = {"README.md"} | {f"{n}/{f}" for n in names for f in
                            ("sae_weights.safetensors", "config.json", "cfg.json", "training_log.jsonl")}  # fmt: skip
    want.add(f"{names[0]}/eval_results.json")
    assert set(files) == want  # no checkpoints, no status files, not the failed trainer
    for path, content in files.items():
        if path != "README.md":
            assert content == (run_dir / path).read_bytes()
    card = files["README.md"].decode()
    meta = huggingface_hub.ModelCard(card).data.to_dict()  # the Hub's own parser of the YAML header
    assert meta["library_name"] == "saelens" and meta["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert {"sparse-autoencoder", "jumprelu", "sae-lens"} <= set(meta["tags"])
    assert "0.9321" in card and "| 32 |" in card and "| 64 |" in card  # loss recovered (zero abl.), widths
    assert "| 0.71 | 0.2468 | 0.8642 | 0.9321 |" in card  # FVE, delta loss, loss recovered mean / zero abl.
    assert "FVE (standard)" in card and "mean abl." in card
    assert "JumpReluAutoEncoder.from_pretrained" in card and "SAE.load_from_disk" in card


def test_push_of_one_trainer_folder_uses_its_name(run_dir, mock_hub):
    hub = mock_hub()
    one = run_dir / "jumprelu_w64_tl0-4_lr0.001_s0"
    push_to_hub(one, REPO, token="hf_test_token")
    assert "jumprelu_w64_tl0-4_lr0.001_s0/sae_weights.safetensors" in hub.committed_files()


@pytest.mark.parametrize(
    "fail", [{"/api/repos/create": 401, f"/api/models/{REPO}": 401}, {"/commit/main": 500}]
)
def test_push_failure_is_one_clear_error_and_keeps_files(run_dir, mock_hub, fail):
    mock_hub(fail)
    before = tree_hash(run_dir)
    with pytest.raises(HubPushError, match=f"push to {REPO} failed") as e:
        push_to_hub(run_dir, REPO, token="hf_test_token")
    assert "\n" not in str(e.value)
    assert tree_hash(run_dir) == before


def test_offline_push_fails_fast_and_cli_exits_nonzero(run_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = MockHub()
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    try:
        before = tree_hash(run_dir)
        with pytest.raises(HubPushError, match="Hub is offline"):
            push_to_hub(run_dir, REPO, token="hf_test_token")
        assert main([str(run_dir), REPO]) == 1
        assert "offline" in capsys.readouterr().err
        assert hub.requests == [] and tree_hash(run_dir) == before
    finally:
        huggingface_hub.set_client_factory(default_client_factory)


def test_missing_token_and_empty_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubPushError, match="no Hugging Face token"):
        push_to_hub(tmp_path, REPO)
    with pytest.raises(HubPushError, match="no finished trainer folder"):
        push_to_hub(tmp_path, REPO, token="hf_x")


def test_push_checkpoints_adds_the_sae_snapshots(run_dir, mock_hub, monkeypatch):
    """Issue 16, Also: --push-checkpoints (checkpoints=True; hub CLI --checkpoints) uploads each trainer's
    log-spaced snapshots checkpoints/step_*/ with their SAE files, never the full-state latest/."""
    hub = mock_hub()
    names = sorted(d.name for d in find_saes(run_dir, finished=True))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert main([str(run_dir), REPO, "--checkpoints"]) == 0
    files = hub.committed_files()
    snaps = {f"{n}/checkpoints/step_{s:08d}/{f}" for n in names for s in (8, 16)
             for f in ("sae_weights.safetensors", "config.json", "cfg.json")}  # fmt: skip
    assert snaps <= set(files) and not any("latest" in p for p in files)
    for path in snaps:
        assert files[path] == (run_dir / path).read_bytes()
    assert "checkpoints/step_" in files["README.md"].decode()


def test_push_checks_before_any_request(mock_hub, monkeypatch):
    """Issue 16, defect 8: a malformed repo id or a missing token is found without a request (demo.py
    calls check_push before the harvest)."""
    hub = mock_hub()
    with pytest.raises(HubPushError, match="not a valid Hub repo id"):
        check_push("not a repo id!", token="hf_x")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubPushError, match="no Hugging Face token"):
        check_push("me/saes")
    assert check_push("me/saes", token="hf_x") == "hf_x"
    assert hub.requests == []
