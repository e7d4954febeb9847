"""On-disk activation cache: bit-exact round trip, shuffling, resume, bad shards, Hub push (mocked)."""

import base64
import errno
import json
import logging

import pytest
import torch
import transformers
from nnsight.modeling.transformers import TransformersModel

from dictionary_learning import cache as cache_mod
from dictionary_learning.buffer import ActivationBuffer
from dictionary_learning.cache import ActivationCache, push_cache_to_hub, write_cache
from dictionary_learning.utils import DataExhausted, prepare_embedded_model


def batches(n_batches=7, B=13, d=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, generator=g).to(dtype) for _ in range(n_batches)]


def drain(it):
    out = []
    with pytest.raises(DataExhausted) as err:
        while True:
            out.append(next(it))
    return torch.cat(out), err.value


def sorted_rows(x):
    """Rows in a canonical order (lexicographic on the raw bits), to compare multisets exactly."""
    keys = x.float().view(torch.int32) if x.dtype != torch.float32 else x.view(torch.int32)
    order = sorted(range(len(x)), key=lambda i: keys[i].tolist())
    return x[order]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_exact(tmp_path, dtype):
    data = batches(dtype=dtype)
    want = torch.cat(data)[:80]
    m = write_cache(
        iter(data),
        tmp_path / "c",
        n_tokens=80,
        meta={
            "model": "toy",
            "hook": "blocks.0.hook_resid_post",
            "layer": 0,
            "site": "resid_post",
            "ctx_len": 8,
        },
        shard_rows=16,
    )
    assert [s["rows"] for s in m["shards"]] == [16] * 5 and m["n_tokens"] == 80 and m["d"] == 6
    assert m["dtype"] == str(dtype).removeprefix("torch.") and not m["exhausted"]
    assert m["mean_squared_norm"] == pytest.approx(want.double().pow(2).sum(1).mean().item(), rel=1e-12)
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["hook"] == "blocks.0.hook_resid_post"
    c = ActivationCache(tmp_path / "c", batch_size=7, seed=1)
    got, err = drain(c)
    assert got.dtype == dtype and len(got) == 80 and err.tokens_yielded == 80
    assert torch.equal(sorted_rows(got), sorted_rows(want))  # every row exactly once, bit-exact
    # shards are stored in write order, unshuffled
    assert torch.equal(c.load_shard(2), want[32:48])


def test_manifest_dtype_is_the_shards_dtype(tmp_path):
    """A buffer's dtype *name* in meta ('bf16') must not replace the shards' dtype in the manifest."""
    x = torch.randn(40, 4).to(torch.bfloat16)
    m = write_cache([x], tmp_path / "c", n_tokens=40, meta={"dtype": "bf16", "model": "m"})
    assert m["dtype"] == "bfloat16"
    got = next(ActivationCache(tmp_path / "c", batch_size=40, shards_per_group=1))
    assert torch.equal(got.sort(0).values, x.sort(0).values)


def test_shuffles_across_shards_and_seeds(tmp_path):
    data = [torch.arange(64, dtype=torch.float32)[:, None].repeat(1, 4)]
    write_cache(data, tmp_path / "c", 64, shard_rows=8)
    a = next(ActivationCache(tmp_path / "c", batch_size=16, seed=0, shards_per_group=4))
    b = next(ActivationCache(tmp_path / "c", batch_size=16, seed=0, shards_per_group=4))
    c = next(ActivationCache(tmp_path / "c", batch_size=16, seed=5, shards_per_group=4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(set((a[:, 0] // 8).tolist())) >= 3  # one batch draws on several shards


def test_epochs_and_resume(tmp_path):
    write_cache(batches(), tmp_path / "c", 91, shard_rows=10)
    got, err = drain(ActivationCache(tmp_path / "c", batch_size=8, epochs=2, shards_per_group=3))
    assert len(got) == 182 and err.tokens_yielded == 182 and "after 2 epoch(s)" in str(err)
    assert torch.equal(sorted_rows(got[:91]), sorted_rows(torch.cat(batches())[:91]))
    assert torch.equal(sorted_rows(got[91:]), sorted_rows(got[:91]))
    assert not torch.equal(got[:91], got[91:])  # a new order each epoch
    for k in (0, 3, 11, 12, 20):
        full = ActivationCache(tmp_path / "c", batch_size=8, epochs=2, shards_per_group=3)
        for _ in range(k):
            next(full)
        state = json.loads(json.dumps(full.state_dict()))
        resumed = ActivationCache(tmp_path / "c", batch_size=8, epochs=2, shards_per_group=3)
        resumed.load_state_dict(state)
        rest_full, _ = drain(full)
        rest_resumed, _ = drain(resumed)
        assert torch.equal(rest_full, rest_resumed) and resumed.tokens_yielded == full.tokens_yielded
    with pytest.raises(ValueError, match="seed=0 does not match"):
        ActivationCache(tmp_path / "c", seed=2).load_state_dict(state)


def test_bad_shards_named(tmp_path):
    write_cache(batches(), tmp_path / "c", 60, shard_rows=20)
    shard = tmp_path / "c" / "shard_00001.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-50])  # truncated
    with pytest.raises(
        ValueError, match=r"shard_00001\.safetensors: .* bytes, the manifest says .* \(truncated\?\)"
    ):
        ActivationCache(tmp_path / "c")
    # truncated and the manifest edited to match: the shard itself is refused, by name
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["shards"][1]["bytes"] = len(raw) - 50
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    c = ActivationCache(tmp_path / "c", shards_per_group=1, verify=False)
    with pytest.raises(ValueError, match=r"shard_00001\.safetensors: unreadable safetensors shard"):
        drain(c)
    with pytest.raises(ValueError, match=r"shard_00001\.safetensors: sha256 does not match"):
        drain(ActivationCache(tmp_path / "c", shards_per_group=1))
    # a shard whose content disagrees with the manifest (wrong rows), same byte size
    shard.write_bytes(raw)
    manifest["shards"][1].update(bytes=len(raw), rows=21, sha256=cache_mod._sha256(shard))
    manifest["shards"][0]["rows"] = 19
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"shard_00001\.safetensors: holds \(20, 6\)"):
        # (no read-time massive-token rule: it would read shard 0 first for its median norm)
        drain(ActivationCache(tmp_path / "c", shards_per_group=1, seed=3, max_norm_multiple=None))
    (tmp_path / "c" / "shard_00002.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match="shard_00002.safetensors: shard listed in the manifest is missing"
    ):
        ActivationCache(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no such cache folder"):
        ActivationCache(tmp_path / "nowhere" / "deeper")


@pytest.mark.parametrize("escape", ["absolute path", "dot-dot", "symlink out"])
def test_shard_names_outside_the_cache_are_refused(tmp_path, escape):
    """Issue 16, defect 4: a manifest whose shard `file` is absolute, climbs with '..' or is a symlink
    out of the folder is refused by name before the file is looked at (its size is not revealed)."""
    write_cache(batches(), tmp_path / "c", 60, shard_rows=20)
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"s" * 4321)
    mpath = tmp_path / "c" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    if escape == "absolute path":
        manifest["shards"][1]["file"] = str(secret)
    elif escape == "dot-dot":
        manifest["shards"][1]["file"] = "../secret.safetensors"
    else:
        shard = tmp_path / "c" / manifest["shards"][1]["file"]
        shard.unlink()
        shard.symlink_to(secret)
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json: shard 1: .*outside the cache folder") as err:
        ActivationCache(tmp_path / "c")
    assert "4321" not in str(err.value) and "\n" not in str(err.value)


def test_hub_snapshot_symlinks_into_its_blobs_still_load(tmp_path, monkeypatch):
    """The Hub's download cache holds snapshots/<rev>/<file> as symlinks to ../../blobs/<hash>: those
    stay inside the repo's cache folder and load; one pointing further out is refused."""
    import huggingface_hub

    write_cache(batches(), tmp_path / "c", 60, shard_rows=20)
    repo = tmp_path / "hub" / "datasets--me--acts"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for f in sorted((tmp_path / "c").iterdir()):
        f.rename(repo / "blobs" / f"{f.stem}.blob")
        (snap / f.name).symlink_to(f"../../blobs/{f.stem}.blob")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snap))
    got, _ = drain(ActivationCache("me/acts", batch_size=7))
    assert torch.equal(sorted_rows(got), sorted_rows(torch.cat(batches())[:60]))
    outside = tmp_path / "elsewhere.safetensors"
    (repo / "blobs" / "shard_00001.blob").rename(outside)
    (snap / "shard_00001.safetensors").unlink()
    (snap / "shard_00001.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="shard 1: .*outside the cache folder"):
        ActivationCache("me/acts")


def test_harvest_progress_bar_and_planned_end_of_data(tmp_path, capsys, caplog):
    """Issue 16, Also: write_cache shows tokens harvested against the target, with tok/s (progress=True);
    with reread=True (the cache will be re-read for several epochs) running out is said at INFO."""
    write_cache(batches(), tmp_path / "a", 60, shard_rows=20, progress=True)
    err = capsys.readouterr().err
    assert "harvest: 100%" in err and "60.0/60.0" in err and "tok/s" in err  # tqdm's unit_scale format
    write_cache(batches(), tmp_path / "b", 60, shard_rows=20, progress=False)
    assert capsys.readouterr().err == ""
    with caplog.at_level(logging.INFO, logger="dictionary_learning.cache"):
        m = write_cache(batches(2), tmp_path / "c", 1000, shard_rows=20, reread=True)
    assert m["exhausted"] and m["n_tokens"] == 26
    (rec,) = [r for r in caplog.records if "26 of 1000" in r.getMessage()]
    assert rec.levelno == logging.INFO and "re-read" in rec.getMessage()


@pytest.mark.parametrize("kind", ["SafetensorError", "OSError"])
def test_disk_full_while_writing_a_shard_names_it_in_one_line(tmp_path, monkeypatch, kind):
    """Issue 16, defect 12: a full disk while writing shard 1 raises "no space left on device: PATH"
    (an OSError; was a SafetensorError traceback), and leaves shard 0 alone: no temporary, no manifest."""
    from safetensors import SafetensorError

    real = cache_mod.save_file

    def full_disk(tensors, path, *a, **k):
        if ".shard_00001." in str(path):  # atomic_path's temporary beside shard_00001.safetensors
            with open(path, "wb") as f:  # a partial file, as a real full disk leaves
                f.write(b"\0" * 100)
            if kind == "SafetensorError":  # safetensors' error as it reads on a full disk
                raise SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)"
                )
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(cache_mod, "save_file", full_disk)
    out = tmp_path / "cache"
    with pytest.raises(OSError) as err:
        write_cache(batches(), out, n_tokens=91, shard_rows=32)
    assert str(err.value) == f"no space left on device: {out / 'shard_00001.safetensors'}"
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in out.iterdir()) == ["shard_00000.safetensors"]


def test_write_cache_guards(tmp_path, caplog):
    write_cache(batches(), tmp_path / "c", 30)
    with pytest.raises(FileExistsError, match="already holds an activation cache"):
        write_cache(batches(), tmp_path / "c", 30)
    with caplog.at_level(logging.WARNING):
        m = write_cache(batches(2), tmp_path / "c", 1000, overwrite=True, shard_rows=10)
    assert m["exhausted"] and m["n_tokens"] == 26 and m["requested_tokens"] == 1000
    assert "data ran out after 26 of 1000" in caplog.text
    assert sorted(p.name for p in (tmp_path / "c").glob("shard_*")) == [
        f"shard_0000{i}.safetensors" for i in range(3)
    ]
    with pytest.raises(ValueError, match="batches must be"):
        write_cache([{"a": torch.zeros(2, 3)}], tmp_path / "d", 5)
    with pytest.raises(ValueError, match="no activations"):
        write_cache([], tmp_path / "e", 5)


def test_from_activation_buffer(tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(prepare_embedded_model())
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    nm = TransformersModel(transformers.AutoModelForCausalLM.from_config(cfg).eval(), tokenizer=tok)
    texts = ["The liver makes bile.", "Insulin lowers blood glucose in most patients."] * 5
    kw = dict(ctx_len=16, n_ctxs=4, batch_size=10)
    m = write_cache(ActivationBuffer(texts, nm, 0, **kw), tmp_path / "c", n_tokens=45, shard_rows=20)
    assert m["hook"] == "blocks.0.hook_resid_post" and m["layer"] == 0 and m["ctx_len"] == 16 and m["d"] == 32
    assert m["buffer"]["n_ctxs"] == 4 and m["counters"]["tokens_yielded"] == 50
    fresh = ActivationBuffer(texts, nm, 0, **kw)
    want = torch.cat([next(fresh) for _ in range(5)])[:45]
    got, _ = drain(ActivationCache(tmp_path / "c", batch_size=9))
    assert torch.equal(sorted_rows(got), sorted_rows(want))


# ---------------------------------------------------------------------------- Hub (mocked)


@pytest.fixture
def mock_hub():
    """Route huggingface_hub's HTTP client to an in-process handler; restore it afterwards."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.utils import _http

    requests = []

    def handler(request):
        path, body = request.url.path, request.content
        requests.append((request.method, path, body))
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": "https://huggingface.co/datasets/me/acts"})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return httpx2.Response(
                200,
                json={
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                },
            )
        if "/commit/" in path:
            return httpx2.Response(
                200,
                json={
                    "commitUrl": "https://huggingface.co/datasets/me/acts/commit/" + "a" * 40,
                    "commitOid": "a" * 40,
                },
            )
        return httpx2.Response(404, json={"error": f"unexpected {path}"})

    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler)))
    try:
        yield requests
    finally:
        huggingface_hub.set_client_factory(_http.default_client_factory)


def test_push_to_hub_and_load_back(tmp_path, mock_hub, monkeypatch):
    write_cache(batches(), tmp_path / "c", 50, meta={"model": "toy", "hook": "h"}, shard_rows=20)
    (tmp_path / "c" / "stray.tmp").write_text("not uploaded")
    push_cache_to_hub(tmp_path / "c", "me/acts", private=True, token="hf_test")
    methods_paths = [(m, p) for m, p, _ in mock_hub]
    assert methods_paths[0] == ("POST", "/api/repos/create")
    create = json.loads(mock_hub[0][2])
    assert create["type"] == "dataset" and create["name"] == "acts" and create["organization"] == "me"
    assert create.get("private") is True or create.get("visibility") == "private"
    assert ("POST", "/api/datasets/me/acts/commit/main") in methods_paths
    commit = [json.loads(line) for line in mock_hub[-1][2].decode().splitlines()]
    files = {
        c["value"]["path"]: base64.b64decode(c["value"]["content"]) for c in commit if c["key"] == "file"
    }
    local = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir() if p.name != "stray.tmp"}
    assert files == local  # manifest + every shard, byte for byte; nothing else

    calls = []

    def fake_snapshot_download(repo_id, repo_type=None, revision=None, token=None):
        calls.append((repo_id, repo_type))
        return str(tmp_path / "c")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    c = ActivationCache("me/acts", batch_size=50)
    assert calls == [("me/acts", "dataset")] and c.manifest["model"] == "toy"
    assert torch.equal(sorted_rows(next(c)), sorted_rows(torch.cat(batches())[:50]))


def test_rows_dropped_when_read_are_counted_once_across_a_resume(tmp_path):
    """A cache harvested without the massive-token rule (another tool, an older version) is filtered as it
    is read; the count of dropped rows survives state_dict / load_state_dict (not restarted, not doubled)."""
    data = batches(n_batches=8, B=16, d=6)
    planted = [(b, (5 * b) % 16) for b in range(8)]  # (batch, row): 1000x the others' norm, one per shard
    for b, r in planted:
        data[b][r] *= 1000
    write_cache(iter(data), tmp_path / "c", n_tokens=128, meta={"model": "toy"}, shard_rows=16)
    kw = dict(batch_size=8, seed=2, shards_per_group=2, max_norm_multiple=10.0)
    whole = ActivationCache(tmp_path / "c", **kw)
    rows, _ = drain(whole)
    assert whole.massive_dropped == len(planted) and len(rows) == 128 - len(planted)
    first = ActivationCache(tmp_path / "c", **kw)
    head = [next(first) for _ in range(5)]  # stops inside a group of shards
    state = json.loads(json.dumps(first.state_dict()))
    second = ActivationCache(tmp_path / "c", **kw)
    second.load_state_dict(state)
    tail, _ = drain(second)
    assert torch.equal(torch.cat([*head, tail]), rows)
    assert second.massive_dropped == len(planted)


def test_a_killed_writes_temporaries_are_removed_by_the_next_write(tmp_path):
    """Issue 16 (Also): a kill inside a shard write leaves atomic_path's `.shard_*.tmp`; the next write of
    the cache (the only writer: demo.py holds the run folder's lock) removes it."""
    (tmp_path / "c").mkdir()
    stale = [tmp_path / "c" / ".shard_00001.safetensors.k3j2.tmp", tmp_path / "c" / ".manifest.json.x9.tmp"]
    for p in stale:
        p.write_bytes(b"half a shard")
    keep = tmp_path / "c" / "notes.txt"  # not ours: left alone
    keep.write_text("user file")
    write_cache(iter(batches()), tmp_path / "c", n_tokens=40, meta={"model": "toy"}, shard_rows=16)
    assert not any(p.exists() for p in stale) and keep.read_text() == "user file"
    assert len(drain(ActivationCache(tmp_path / "c", batch_size=8, max_norm_multiple=None))[0]) == 40
