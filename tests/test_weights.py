import hashlib
import http.server
import json
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

from u2zoo.errors import ConfigError, WeightsError
from u2zoo.zoo import weights as W
from u2zoo.zoo.archs import build_arch

from conftest import REAL_WEIGHTS


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/'srv', stopped after the test."""
    root = tmp_path / "srv"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def tiny_checkpoint(path: Path) -> str:
    torch.manual_seed(1)
    torch.save(build_arch("u2net-tiny").state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_over_http_is_verified_then_renamed(http_root, tmp_path):
    root, base = http_root
    sha = tiny_checkpoint(root / "tiny.pth")
    dest = tmp_path / "cache" / "tiny.pth"
    assert W.download(f"{base}/tiny.pth", dest, sha256=sha, progress=False) == dest
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha
    assert sorted(p.name for p in dest.parent.iterdir() if not p.name.endswith(".lock")) == ["tiny.pth"]


def test_hash_mismatch_leaves_nothing_behind(http_root, tmp_path):
    root, base = http_root
    tiny_checkpoint(root / "tiny.pth")
    dest = tmp_path / "cache" / "tiny.pth"
    with pytest.raises(WeightsError, match="hash mismatch.*expected sha256 0+"):
        W.download(f"{base}/tiny.pth", dest, sha256="0" * 64, progress=False)
    assert not dest.exists()
    assert [p for p in dest.parent.iterdir() if p.suffix == ".part"] == []
    with pytest.raises(WeightsError, match="expected md5"):
        W.download(f"{base}/tiny.pth", dest, md5="0" * 32, progress=False)


def test_unverifiable_or_unreachable_downloads_are_refused(http_root, tmp_path):
    _, base = http_root
    with pytest.raises(WeightsError, match="without a known hash"):
        W.download(f"{base}/tiny.pth", tmp_path / "x.pth", progress=False)
    with pytest.raises(WeightsError, match="download failed"):
        W.download(f"{base}/missing.pth", tmp_path / "x.pth", sha256="0" * 64, progress=False)


def test_model_from_url_needs_and_checks_its_sha256(http_root):
    root, base = http_root
    sha = tiny_checkpoint(root / "tiny.pth")
    with pytest.raises(ConfigError, match="needs its sha256"):
        W.load_model("u2net-tiny", weights=f"{base}/tiny.pth")
    model, info, _ = W.load_model("u2net-tiny", weights=f"{base}/tiny.pth", weights_sha256=sha, progress=False)
    assert info.sha256 == sha and info.source.startswith("http://127.0.0.1")
    expected = torch.load(root / "tiny.pth", weights_only=True)
    torch.testing.assert_close(model.state_dict()["side1.weight"], expected["side1.weight"])


def test_file_url_and_local_path_work_like_names(tmp_path):
    path = tmp_path / "tiny.pth"
    sha = tiny_checkpoint(path)
    _, info, _ = W.load_model("u2net-tiny", weights=path.as_uri(), weights_sha256=sha, progress=False)
    assert info.sha256 == sha
    _, info, _ = W.load_model("u2net-tiny", weights=str(path))
    assert info.sha256 == sha and info.name is None


@pytest.mark.skipif(not REAL_WEIGHTS.is_file(), reason="../shared weights not present")
def test_fetch_imports_real_weights_into_the_cache_and_names_them(isolated_cache, monkeypatch):
    import dataclasses

    shipped = W.find_entry("u2netp.fp16_bnfolded")
    with pytest.raises(WeightsError, match="ships inside the package"):
        W.fetch(shipped, str(REAL_WEIGHTS), progress=False)
    # a registered, hash-pinned entry that is not shipped: imported from a local file
    entry = dataclasses.replace(shipped, name="u2netp.imported", filename="u2netp_imported.pth", bundled=False)
    monkeypatch.setitem(W.REGISTRY, entry.name, entry)
    path = W.fetch(entry, str(REAL_WEIGHTS), progress=False)
    assert path == isolated_cache / "weights" / "u2netp_imported.pth"
    assert W.cached_entries("u2netp") == [shipped, entry]
    _, info, contract = W.load_model("u2netp.imported")
    assert info.sha256 == entry.sha256 and contract.pre.size == (320, 320)
    # a local file is recognised by its hash, whatever its path
    _, info, _ = W.load_model("u2netp", weights=str(REAL_WEIGHTS))
    assert info.name == "u2netp.fp16_bnfolded"


def test_fetch_refuses_a_wrong_file_and_entries_without_hash(tmp_path):
    wrong = tmp_path / "wrong.pth"
    tiny_checkpoint(wrong)
    with pytest.raises(WeightsError, match="hash mismatch"):
        W.fetch(W.find_entry("u2netp"), str(wrong), progress=False)
    with pytest.raises(WeightsError, match="never downloaded unverified"):
        W.fetch(W.find_entry("u2net_portrait"), progress=False)


def test_registry_entries_are_complete():
    assert set(W.REGISTRY) >= {"u2net", "u2netp", "u2net_portrait", "u2net_human_seg"}
    assert W.REGISTRY["u2netp"].md5 == "e4f636406ca4e2af789941e7f139ee2e"
    for entry in W.REGISTRY.values():
        assert entry.license == "Apache-2.0" and entry.task in {"saliency", "human-seg", "portrait-drawing"}
        assert entry.arch in {"u2net", "u2netp", "u2net-lite"} and entry.num_params
    assert W.REGISTRY["u2net_portrait"].contract.post.invert is True


def test_missing_truncated_and_code_carrying_checkpoints(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        W.read_state_dict(tmp_path / "nope.pth")
    good = tmp_path / "good.pth"
    tiny_checkpoint(good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        W.read_state_dict(cut)
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WeightsError, match="corrupt"):
        W.read_state_dict(tmp_path / "junk.pth")
    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "payload": Payload()}, evil)
    with pytest.raises(WeightsError, match="pickled code"):
        W.read_state_dict(evil)
    assert not (tmp_path / "pwned").exists()


class Payload:
    """Unpickling this would create a file; weights_only loading must refuse before that."""

    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / "pwned",))


def test_checkpoint_of_another_architecture_names_the_keys(tmp_path):
    path = tmp_path / "tiny.pth"
    tiny_checkpoint(path)
    with pytest.raises(WeightsError, match=r"does not fit architecture 'u2netp'.*of other shape \(e\.g\. stage1"):
        W.load_model("u2netp", weights=str(path))
    state = torch.load(path, weights_only=True)
    del state["outconv.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(
        WeightsError, match=r"1 missing \(e\.g\. outconv\.weight\); 1 unexpected \(e\.g\. extra\.weight\)"
    ):
        W.load_model("u2net-tiny", weights=str(path))


def test_names_resolve_with_suggestions_and_no_silent_random_weights(monkeypatch):
    import dataclasses

    assert W.resolve_model_name("u2net_human_seg")[0] == "u2net"
    assert W.resolve_model_name("u2net-tiny") == ("u2net-tiny", None)
    with pytest.raises(ConfigError, match="did you mean 'u2netp'"):
        W.resolve_model_name("u2nep")
    with pytest.raises(WeightsError, match="--random-weights"):
        W.load_model("u2net-tiny")
    unshipped = dataclasses.replace(
        W.REGISTRY["u2netp.fp16_bnfolded"], name="u2netp.elsewhere", filename="u2netp_elsewhere.pth", bundled=False
    )
    monkeypatch.setitem(W.REGISTRY, unshipped.name, unshipped)
    with pytest.raises(WeightsError, match="has no public URL"):
        W.load_model("u2netp.elsewhere")
    _, info, _ = W.load_model("u2net-tiny", random_weights=True)
    assert info.source == "random" and info.sha256 is None


def test_random_weights_are_the_same_on_every_call():
    """The bench builds the reference and every artifact from separate load_model calls."""
    torch.manual_seed(123)
    first, _, _ = W.load_model("u2net-tiny", random_weights=True)
    second, _, _ = W.load_model("u2net-tiny", random_weights=True)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.initial_seed() == 123  # the caller's generator is left alone


def test_shipped_lite_weights_load_offline_and_are_verified(monkeypatch, tmp_path):
    """`--model u2net-lite` needs no --weights: the package carries them, hash-pinned."""
    entry = W.REGISTRY["u2net-lite"]
    assert W.resolve_model_name("u2net-lite") == ("u2net-lite", entry) and entry.bundled
    model, info, _ = W.load_model("u2net-lite")
    assert info.name == "u2net-lite" and info.sha256 == entry.sha256 == W.file_digest(entry.cache_path())
    assert entry.cache_path().stat().st_size == entry.file_size
    assert sum(p.numel() for p in model.parameters()) == entry.num_params
    record = json.loads(entry.cache_path().with_suffix(".json").read_text())
    assert record["sha256"] == entry.sha256 and record["recipe"]["teacher"]["name"] == "u2netp.fp16_bnfolded"
    changed = bytearray(entry.cache_path().read_bytes())
    changed[-100] ^= 1
    (tmp_path / entry.filename).write_bytes(changed)
    monkeypatch.setattr(W, "BUNDLED_DIR", tmp_path)
    with pytest.raises(WeightsError, match="u2net_lite_distilled_fp16.pth is damaged or was changed.*reinstall"):
        W.load_model("u2net-lite")
