"""``compile: true``: torch.compile (inductor) computes the same loss and gradients as eager, names unchanged."""

import torch

from greenlab.config import build
from greenlab.objectives.base import use_channels_last
from tests.conftest import TINY_VIT


def test_compiled_token_reconstruction_gives_the_eager_loss_and_gradients(monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor, "fallback_random", True)  # the corruption draws the same numbers as eager
    torch.manual_seed(0)
    vit = build("backbone/vit_small_reg4_dinov2", img_size=28, weights="random", model_kwargs=TINY_VIT)
    module = build("objective/token_reconstruction", backbone=vit).train()
    images = torch.randn(4, 3, 28, 28)
    names = list(module.state_dict())

    def loss_and_gradients():
        module.zero_grad()
        torch.manual_seed(1)
        loss = module(images)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    eager = loss_and_gradients()
    assert module.compile_networks() == ["forward"]
    compiled = loss_and_gradients()
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    assert compiled[1].keys() == eager[1].keys() and len(eager[1]) > 0
    for name, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert list(module.state_dict()) == names, "checkpoints and exports keep their keys"


def test_channels_last_covers_2d_and_3d_convolutions_and_keeps_the_outputs():
    """``channels_last: true`` on a 3D CNN objective: 5-D weights go to NDHWC (``Module.to(channels_last)``
    refuses them), 4-D ones to NHWC; same outputs and state_dict keys."""
    torch.manual_seed(0)
    encoder = build("backbone/resnet3d18", depth=10, stem_kernel=4, weights="random").eval()
    module = build("objective/label_supervised", backbone=encoder)
    module.head = torch.nn.Conv2d(2, 3, 1)  # a 4-D weight beside the 3-D network's 5-D ones
    volumes = torch.randn(2, 1, 16, 32, 32)
    before, names = encoder(volumes), list(module.state_dict())

    use_channels_last(module)
    assert encoder.net.stem[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert module.head.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(encoder(volumes), before, rtol=1e-4, atol=1e-5)
    assert list(module.state_dict()) == names
