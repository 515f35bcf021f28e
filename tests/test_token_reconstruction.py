import copy

import lightning as L
import pytest
import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
    learned = tiny_objective(corruption_token="learned", clip="student")  # greenlab's option: a trained token
    assert learned.corruption_token.requires_grad and learned.corruption_token.abs().sum() > 0


def test_last_sample_of_the_batch_reaches_the_student_clean():
    module = tiny_objective(noise_std=0.2)
    images = torch.randn(4, 3, 28, 28)
    noisy = module.add_pixel_noise(images)
    assert torch.equal(noisy[-1], images[-1]) and not torch.equal(noisy[0], images[0])


def official_steps(
    module: TokenReconstruction, images: torch.Tensor, steps: int, epochs: bool = False
) -> list[float]:
    """TokenReconstructionPretraining.ipynb's loop, verbatim, on ``module`` (the seed per step: the same draws);
    ``epochs``: each step an epoch of its own (the schedule stepped after it)."""
    configured = module.configure_optimizers()
    optim, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    scaler = torch.amp.GradScaler("cpu")
    module.train()
    coefficients = []
    for step in range(steps):
        torch.manual_seed(step)
        optim.zero_grad()
        loss = module(images)
        scaler.scale(loss).backward()
        scaler.unscale_(optim)
        total = torch.nn.utils.clip_grad_norm_(module.parameters(), 0.1)
        scaler.step(optim)
        scaler.update()
        coefficients.append(min(1.0, 0.1 / (total.item() + 1e-6)))
        if epochs:
            schedule.step()
    return coefficients


def greenlab_steps(module: TokenReconstruction, images: torch.Tensor, steps: int) -> list[dict]:
    """The hooks in Lightning's order (zero_grad, forward, ``backward``, ``configure_gradient_clipping``,
    step); returns what each clipping saw, with the token's gradient before it was clipped."""
    optim = module.configure_optimizers()["optimizer"]
    module.train()
    seen = []
    for step in range(steps):
        torch.manual_seed(step)
        optim.zero_grad()
        module.backward(module(images))
        accumulated = module.corruption_token.grad.clone()
        module.configure_gradient_clipping(optim, 0.1, "norm")
        seen.append(
            {**module.last_clip, "accumulated": accumulated, "clipped": module.corruption_token.grad.clone()}
        )
        optim.step()
    return seen


def test_official_clipping_is_the_notebooks_loop_exactly():
    """clip=official: the GradScaler loop's token gradient (scaled, never zeroed, never unscaled) enters the
    norm; the student's parameters, the token's gradient and the coefficients equal the notebook's loop."""
    module = tiny_objective(noise_std=0.2)
    assert module.hparams.clip == "official" and isinstance(module.corruption_token, nn.Parameter)
    official, ours = copy.deepcopy(module), copy.deepcopy(module)
    images = torch.randn(4, 3, 28, 28)
    coefficients = official_steps(official, images, steps=4)
    seen = greenlab_steps(ours, images, steps=4)
    assert [s["clip_coef"] for s in seen] == pytest.approx(coefficients, rel=1e-6)
    for (name, a), b in zip(official.named_parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(official.corruption_token.grad, ours.corruption_token.grad, rtol=0, atol=0)
    assert torch.equal(ours.corruption_token, torch.zeros(48)), "the official token is never updated"
    # the accumulation: step 2's token gradient = step 1's clipped one + 2^16 x its own dL/dc (unscaled)
    after_one = copy.deepcopy(module)
    greenlab_steps(after_one, images, steps=1)
    after_one.corruption_token.grad = None
    torch.manual_seed(1)
    after_one(images).backward()
    expected = seen[0]["clipped"] + 65536.0 * after_one.corruption_token.grad
    torch.testing.assert_close(seen[1]["accumulated"], expected, rtol=1e-6, atol=0)
    assert (
        seen[0]["clipped"].norm() <= 0.1 + 1e-6
        and seen[1]["accumulated"].norm() > 1e3 * seen[0]["clipped"].norm()
    )
    # the token's scaled gradient dwarfs the student's: the coefficient is ~0.1 / (2^16 |dL/dc|), far below 1
    assert all(s["token_grad_norm"] > 1e3 * s["student_grad_norm"] for s in seen)
    assert all(s["clip_coef"] < 1e-3 for s in seen) and all(s["loss_scale"] == 65536.0 for s in seen)


class FixedImages(L.LightningDataModule):
    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.images, self.batch_size = images, len(images)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            TensorDataset(self.images, torch.zeros(len(self.images))), batch_size=self.batch_size
        )


class SeedEachStep(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(trainer.global_step)


def test_lightning_runs_the_official_loop_and_resumes_it(tmp_path):
    """Through a real Trainer (its zero_grad leaves the token's gradient alone): the notebook's loop, step for
    step; a checkpoint keeps the GradScaler's state and the token's gradient, so a resumed run continues it."""
    module, images = tiny_objective(noise_std=0.2), torch.randn(4, 3, 28, 28)
    official = copy.deepcopy(module)
    coefficients = official_steps(official, images, steps=3, epochs=True)  # one batch an epoch

    def fit(objective, steps: int, ckpt_path=None) -> L.Trainer:
        trainer = L.Trainer(max_steps=steps, gradient_clip_val=0.1, accelerator="cpu", precision="32-true",
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[SeedEachStep()])  # fmt: skip
        trainer.fit(objective, datamodule=FixedImages(images), ckpt_path=ckpt_path, weights_only=False)
        return trainer

    whole = copy.deepcopy(module)
    fit(whole, 3)
    for (name, a), b in zip(official.named_parameters(), whole.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=name)
    assert whole.last_clip["clip_coef"] == pytest.approx(coefficients[-1], rel=1e-5)
    fit(copy.deepcopy(module), 2).save_checkpoint(tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=False)["official_clip"]
    torch.save(saved, tmp_path / "clip.pt")  # plain floats, ints and a tensor: what weights_only loads
    saved = torch.load(tmp_path / "clip.pt", weights_only=True)
    assert saved["scaler"]["scale"] == 65536.0 and saved["scaler"]["_growth_tracker"] == 2
    assert 0 < saved["token_grad"].norm() <= 0.1 + 1e-6  # clipped with the rest
    resumed = copy.deepcopy(module)
    fit(resumed, 3, ckpt_path=tmp_path / "two.ckpt")
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=name)


def test_student_clipping_and_the_options_it_refuses():
    module = tiny_objective(clip="student")
    assert not isinstance(module.corruption_token, nn.Parameter), "greenlab's: a zero buffer, no gradient"
    module.backward(module(torch.randn(4, 3, 28, 28)))  # Lightning's own backward: nothing scaled
    assert module.scaler is None and module.corruption_token.grad is None
    with pytest.raises(ValueError, match="corruption_token=zeros"):
        tiny_objective(corruption_token="learned")  # clip=official needs the official token
    with pytest.raises(ValueError, match="official or student"):
        tiny_objective(clip="all")


def test_weight_decay_groups_are_the_notebooks():
    """param_groups_weight_decay(model.model, 1e-4), no skip list: [CLS], registers and positions decayed."""
    module = tiny_objective()
    ours = module.configure_optimizers()["optimizer"].param_groups
    reference = param_groups_weight_decay(nn.ModuleList([module.student, module.head]), 1e-4)
    as_ids = lambda groups: {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}  # noqa: E731
    assert as_ids(ours) == as_ids(reference)
    decayed = as_ids(ours)[1e-4]
    assert {
        id(module.student.pos_embed),
        id(module.student.cls_token),
        id(module.student.reg_token),
    } <= decayed
