import copy

import pytest
import torch

from greenlab.config import build
from greenlab.objectives.optim import warmup_cosine_factor
from greenlab.objectives.token_reconstruction import TokenReconstruction
from tests.conftest import TINY_VIT


def tiny_objective(**kwargs) -> TokenReconstruction:
    torch.manual_seed(0)
    vit = build("backbone/vit_small_reg4_dinov2", img_size=28, weights="random", model_kwargs=TINY_VIT)
    return build("objective/token_reconstruction", backbone=vit, **kwargs)


def train_steps(module: TokenReconstruction, images: torch.Tensor, steps: int) -> list[float]:
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = module(images)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_teacher_is_frozen_and_unchanged_after_steps():
    module = tiny_objective(lr=1e-3)
    before = copy.deepcopy(module.teacher.state_dict())
    student_before = copy.deepcopy(module.student.state_dict())
    train_steps(module, torch.randn(4, 3, 28, 28), steps=3)
    assert not module.teacher.training, "teacher must stay in eval mode when the module trains"
    assert all(not p.requires_grad for p in module.teacher.parameters())
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert any(not torch.equal(v, student_before[k]) for k, v in module.student.state_dict().items()), (
        "student must learn"
    )


def test_loss_decreases_on_tiny_vit():
    module = tiny_objective(lr=1e-3, warmup_epochs=0)
    torch.manual_seed(1)
    losses = train_steps(module, torch.randn(8, 3, 28, 28), steps=40)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


def test_student_forward_matches_timm_without_corruption():
    module = tiny_objective().eval()
    images = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(module.student_tokens(images), module.student.forward_features(images))
    assert module.student_tokens(images).shape == (2, 1 + 4 + 4, 48)  # [CLS] + 4 registers + 2x2 patches


def test_corruption_mask_ratio_and_clean_last_image():
    module = tiny_objective()
    torch.manual_seed(0)
    mask = module.corruption_mask(64, 784, torch.device("cpu"))
    assert mask.shape == (64, 784)
    assert not mask[-1].any(), "the last image of each batch stays clean"
    per_image = mask[:-1].float().mean(1)
    assert per_image.max() < 1 / 3 + 0.05 and 0.12 < per_image.mean() < 0.21  # E[U(0,1/3)] = 1/6


def test_corrupted_tokens_are_replaced_by_the_corruption_token():
    module = tiny_objective().eval()
    images = torch.randn(2, 3, 28, 28)
    everything = torch.ones(2, 4, dtype=torch.bool)
    other = torch.randn(2, 3, 28, 28)  # different pixels, all patches corrupted: same tokens
    torch.testing.assert_close(
        module.student_tokens(images, everything), module.student_tokens(other, everything)
    )


def test_pixel_noise_scales_with_image_std():
    module = tiny_objective(noise_std=0.2)
    images = torch.randn(16, 3, 64, 64) * 3.0
    noise = module.add_pixel_noise(images) - images
    assert noise.std().item() == pytest.approx(0.6, rel=0.05)


def test_checkpoint_holds_no_teacher_and_reloads():
    module = tiny_objective()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])  # strict: teacher keys restored from the initial weights


def test_warmup_cosine_schedule_matches_paper_shape():
    f = lambda e: warmup_cosine_factor(e, 5e-5, 5e-9, 5e-9, 10, 100) * 5e-5  # noqa: E731
    assert f(0) == pytest.approx(5e-9)
    assert f(10) == pytest.approx(5e-5)
    assert f(55) == pytest.approx((5e-5 + 5e-9) / 2, rel=1e-6)
    assert f(100) == f(119) == pytest.approx(5e-9)
    assert all(f(e) >= f(e + 1) for e in range(10, 119))


def test_volumes_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="2D images"):
        tiny_objective()(torch.randn(2, 1, 8, 28, 28))


def test_schedule_matches_the_official_timm_cosine_scheduler():
    """RETFound-Green's notebook: timm CosineLRScheduler(t_initial=100, warmup_t=10, warmup_lr_init=5e-9,
    lr_min=5e-9, warmup_prefix=False), stepped per epoch."""
    from timm.scheduler import CosineLRScheduler

    module = tiny_objective()
    ours = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    reference_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-5)
    reference = CosineLRScheduler(reference_optimizer, t_initial=100, warmup_t=10, warmup_lr_init=5e-9,
                                  lr_min=5e-9, warmup_prefix=False)  # fmt: skip
    for epoch in (0, 5, 10, 55, 100, 119):
        reference.step(epoch)
        expected = reference_optimizer.param_groups[0]["lr"]
        assert ours.lr_lambdas[0](epoch) * 5e-5 == pytest.approx(expected, rel=1e-9, abs=1e-15), epoch


def test_corruption_token_is_zero_and_never_updated():
    """The official corruption token is all zeros and sits outside AdamW's parameter groups."""
    module = tiny_objective(lr=1e-3)
    assert torch.equal(module.corruption_token, torch.zeros(48))
    optimizer = module.configure_optimizers()["optimizer"]
    assert all(p is not module.corruption_token for g in optimizer.param_groups for p in g["params"])
    train_steps(module, torch.randn(4, 3, 28, 28), steps=2)
    assert torch.equal(module.corruption_token, torch.zeros(48))
    learned = tiny_objective(corruption_token="learned")  # greenlab's option: a trained token
    assert learned.corruption_token.requires_grad and learned.corruption_token.abs().sum() > 0


def test_last_sample_of_the_batch_reaches_the_student_clean():
    module = tiny_objective(noise_std=0.2)
    images = torch.randn(4, 3, 28, 28)
    noisy = module.add_pixel_noise(images)
    assert torch.equal(noisy[-1], images[-1]) and not torch.equal(noisy[0], images[0])
