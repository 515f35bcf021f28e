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
    model = build("backbone/resnet3d18", depth=18, stem_kernel=2).eval()
    assert model.net.conv1.kernel_size == (2, 2, 2) and model.net.conv1.stride == (2, 2, 2)
    assert model.net.conv1.in_channels == 1 and model.num_features == 512
    lite = build("backbone/resnet3d18", depth=18, stem_kernel=4)
    assert lite.net.conv1.stride == (4, 4, 4)
    volume = torch.randn(2, 1, 32, 32, 32)
    maps = model.forward_features(volume)
    assert maps.ndim == 5 and maps.shape[1] == 512
    torch.testing.assert_close(model(volume), pool(maps, "mean_patch", 0))
