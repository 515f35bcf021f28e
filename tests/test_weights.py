"""``weights`` resolved once (greenlab/backbones/weights.py): cached | hub | random | a path."""

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from greenlab.backbones.weights import Pretrained, resolve_weights, torch_hub_weights
from greenlab.config import build

COMMIT = "0" * 40


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache; ``put(repo_id)`` gives the snapshot folder to fill."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # a download fails at once

    def put(repo_id: str) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(COMMIT)
        snapshot = repo / "snapshots" / COMMIT
        snapshot.mkdir(parents=True)
        return snapshot

    return put


def source(tmp_path, cached: bool, calls: list) -> Pretrained:
    file = tmp_path / "published.pth"
    torch.save({"w": torch.ones(2)}, file)

    def download():
        calls.append("download")
        if not cached:
            raise OSError("no network")
        return file

    return Pretrained("org/published", lambda: file if cached else None, download)


@pytest.mark.parametrize("weights", ["random", None])
def test_random_reads_nothing(weights):
    state, record = resolve_weights(weights, None, "net", "hint")
    assert state is None
    assert record == {"requested": str(weights), "used": "random", "source": None, "note": None}


def test_cached_reads_the_local_copy_and_never_downloads(tmp_path):
    calls = []
    state, record = resolve_weights("cached", source(tmp_path, True, calls), "net", "hint")
    assert torch.equal(state["w"], torch.ones(2)) and not calls
    assert record["used"] == "cached" and str(tmp_path / "published.pth") in record["source"]


def test_cached_without_a_local_copy_is_random_loudly_and_never_downloads(tmp_path, capsys):
    calls = []
    state, record = resolve_weights("cached", source(tmp_path, False, calls), "net", "give a file")
    assert state is None and not calls and record["used"] == "random"
    assert "org/published is not in the local cache" in record["note"]
    err = capsys.readouterr().err
    assert "net: pretrained weights could not be had" in err and "RANDOM initialisation" in err
    assert "give a file" in err


def test_hub_downloads_and_a_failed_download_is_random_loudly(tmp_path, capsys):
    calls = []
    state, record = resolve_weights("hub", source(tmp_path, False, calls), "net", "hint")
    assert state is None and calls == ["download"] and record["used"] == "random"
    assert record["note"] == "download of org/published failed: OSError: no network"
    assert "RANDOM initialisation" in capsys.readouterr().err
    fetched = Pretrained("org/published", lambda: None, lambda: tmp_path / "published.pth")
    state, record = resolve_weights("hub", fetched, "net", "hint")
    assert torch.equal(state["w"], torch.ones(2)) and record["used"] == "hub"


def test_no_published_weights_is_random_loudly(capsys):
    state, record = resolve_weights("cached", None, "3D ResNet-10", "hint")
    assert state is None and record["note"] == "no published weights for 3D ResNet-10"
    assert "RANDOM initialisation" in capsys.readouterr().err


def test_a_path_is_read_and_a_missing_one_is_an_error(tmp_path):
    torch.save({"module.w": torch.ones(1)}, tmp_path / "w.pth")
    state, record = resolve_weights(str(tmp_path / "w.pth"), None, "net", "hint")
    assert list(state) == ["w"] and record["used"] == "file"  # wrapper prefixes stripped
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        resolve_weights(str(tmp_path / "nope.pth"), None, "net", "hint")


def test_torch_hub_weights_are_looked_up_in_torch_hubs_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    kinetics = torch_hub_weights("Kinetics", "https://download.pytorch.org/models/r3d_18-b3b3357e.pth")
    assert kinetics.cached() is None
    (tmp_path / "checkpoints").mkdir()
    torch.save({}, tmp_path / "checkpoints" / "r3d_18-b3b3357e.pth")
    assert kinetics.cached() == tmp_path / "checkpoints" / "r3d_18-b3b3357e.pth"


def test_nn_mobilenet_takes_timms_imagenet_rexnet_from_the_cache_or_falls_back_loudly(hf_cache, capsys):
    imagenet = timm.create_model("rexnet_100")  # with its classifier, as on the hub
    hub_id = imagenet.pretrained_cfg["hf_hub_id"]
    offline = build("backbone/nn_mobilenet", model_name="rexnet_100", weights="hub")  # nothing cached
    assert offline.init_record["used"] == "random"
    assert f"download of {hub_id} failed" in offline.init_record["note"]
    assert "RANDOM initialisation" in capsys.readouterr().err
    save_file(imagenet.state_dict(), str(hf_cache(hub_id) / "model.safetensors"))
    cached = build("backbone/nn_mobilenet", model_name="rexnet_100", weights="cached")
    assert cached.init_record["used"] == "cached" and hub_id in cached.init_record["source"]
    for key, value in cached.state_dict().items():
        assert torch.equal(value, imagenet.state_dict()[key]), key


def test_text_encoder_reads_a_hub_name_from_the_cached_snapshot(hf_cache):
    fitted = build("text_encoder/random_bert", vocab_size=200, hidden_size=32, num_layers=1, num_heads=2)
    fitted.fit_vocabulary(["no pleural effusion", "there is a small nodule"] * 5)
    snapshot = hf_cache("org/tiny-bert")
    fitted.model.save_pretrained(snapshot)
    fitted.save_tokenizer(snapshot)
    cached = build("text_encoder/pretrained", weights="org/tiny-bert")  # download: false
    assert cached.init_record["used"] == "pretrained" and str(snapshot) in cached.init_record["source"]
    assert cached.init_record["requested"] == "org/tiny-bert" and not cached.needs_vocabulary
    torch.testing.assert_close(cached.eval()(["no nodule"]), fitted.eval()(["no nodule"]))


def test_any_timm_model_by_name_takes_its_cached_hub_weights_without_the_classifier(hf_cache):
    imagenet = timm.create_model("resnet10t")  # the hub file holds its classifier (fc.*)
    hub_id = imagenet.pretrained_cfg["hf_hub_id"]
    save_file(imagenet.state_dict(), str(hf_cache(hub_id) / "model.safetensors"))
    cnn = build("backbone/timm", model_name="resnet10t", img_size=32, weights="cached")
    assert cnn.init_record["used"] == "cached" and cnn.init_record["note"].endswith("): fc.* (2 keys)")
    for key, value in cnn.state_dict().items():
        assert torch.equal(value, imagenet.state_dict()[key]), key
