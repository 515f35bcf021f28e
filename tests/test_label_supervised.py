import torch
import torch.nn.functional as F

from greenlab.config import build
from greenlab.evaluation.embeddings import pool
from greenlab.objectives.label_supervised import masked_bce


def test_masked_bce_ignores_uncertain_and_missing_labels():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 4.0, -2.0]])
    labels = torch.tensor([[1, -1, 0], [-1, 1, -1]])
    known = labels >= 0
    expected = F.binary_cross_entropy_with_logits(logits[known], labels[known].float())
    assert torch.allclose(masked_bce(logits, labels), expected)
    changed = logits.clone()
    changed[labels < 0] += 100.0  # logits of masked entries do not matter
    assert torch.allclose(masked_bce(changed, labels), expected)
    assert masked_bce(logits, torch.full_like(labels, -1)).item() == 0.0


def test_resnet3d_stem_and_embedding():
    torch.manual_seed(0)
    model = build("backbone/resnet3d18", depth=18, stem_kernel=2, weights="random").eval()
    stem = model.net.stem[0]  # the official swap: Conv3d(1, 64, k, stride k, padding 0, bias False)
    assert stem.kernel_size == (2, 2, 2) and stem.stride == (2, 2, 2) and stem.padding == (0, 0, 0)
    assert stem.in_channels == 1 and stem.bias is None and model.num_features == 512
    lite = build("backbone/resnet3d18", depth=18, stem_kernel=4, weights="random")
    assert lite.net.stem[0].stride == (4, 4, 4)
    volume = torch.randn(2, 1, 32, 32, 32)
    maps = model.forward_features(volume)
    assert maps.ndim == 5 and maps.shape[1] == 512
    torch.testing.assert_close(model(volume), pool(maps, "mean_patch", 0))


def official_r3d_18(k: int):
    """SadVoxel/GreenRFM models/clip.py: torchvision r3d_18 with stem[0] = Conv3d(1, 64, k, k, 0, bias=False)."""
    from torchvision.models.video import r3d_18

    net = r3d_18()
    net.stem[0] = torch.nn.Conv3d(1, 64, kernel_size=k, stride=k, padding=0, bias=False)
    net.avgpool, net.fc = torch.nn.AdaptiveAvgPool3d(1), torch.nn.Identity()
    return net.eval()


def test_greenrfm_encoder_is_torchvisions_r3d_18_with_the_official_stem():
    """Same parameters (count and names), same feature grid and the same output as the official encoder,
    input 1x1x48x96x96 (D, H, W), k = 2 and 4; greenlab's volumes are (X, Y, Z), read as (Z, Y, X)."""
    volume = torch.randn(1, 1, 48, 96, 96)
    for k, grid in ((2, (3, 6, 6)), (4, (2, 3, 3))):
        ours, official = (
            build("backbone/resnet3d18", stem_kernel=k, weights="random").eval(),
            official_r3d_18(k),
        )
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in official.parameters())
        official.load_state_dict(
            {name.removeprefix("net."): v for name, v in ours.state_dict().items()}
        )  # strict
        ours_volume = volume.permute(0, 1, 4, 3, 2)  # (X, Y, Z)
        assert ours.forward_features(ours_volume).shape == (1, 512, *grid)
        torch.testing.assert_close(ours(ours_volume), official(volume))


def test_a_torchvision_r3d_18_checkpoint_loads_into_the_trunk(tmp_path):
    """Kinetics-400 / torchvision checkpoints: every trunk tensor loads by name; the RGB stem conv and the
    classifier are replaced, as the official code does after r3d_18(pretrained=True)."""
    from torchvision.models.video import r3d_18

    reference = r3d_18()
    torch.save(reference.state_dict(), tmp_path / "r3d_18.pth")
    model = build("backbone/resnet3d18", weights=str(tmp_path / "r3d_18.pth"))
    assert model.init_record["used"] == "file"
    assert torch.equal(model.net.layer3[0].conv1[0].weight, reference.layer3[0].conv1[0].weight)
    assert torch.equal(model.net.stem[1].weight, reference.stem[1].weight)  # the stem's BN is kept
    assert model.net.stem[0].weight.shape == (64, 1, 2, 2, 2)
    offline = build("backbone/resnet3d18")  # weights=cached, nothing in the torch hub cache: loud, recorded
    assert offline.init_record["used"] == "random" and "cache" in offline.init_record["note"]
