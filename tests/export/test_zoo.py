"""The model registry: every architecture builds, trains a step, and freezes what its mode says."""

from __future__ import annotations

import pytest
import torch

from export.errors import UnknownArchError
from export.net import GRAY_MEAN, GRAY_STD, TEXTURE_CENTER, TEXTURE_CLIP, TEXTURE_SCALE
from export.zoo import FedscanNet, create_model, list_archs

ARCHS = list_archs()
TEXTURE_DIM = 22


def test_registry_lists_the_four_archs() -> None:
    """The zoo offers the two timm backbones and the paper's CNN."""
    assert ARCHS == ["cnn2d", "efficientnet_b0", "resnet10_gn", "resnet18"]


def test_unknown_arch_error_lists_the_choices() -> None:
    """A typo in an architecture name is a clear error naming what exists."""
    with pytest.raises(UnknownArchError) as err:
        create_model("resnet19")
    for name in ARCHS:
        assert name in str(err.value)
    assert err.value.exit_code == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_step(arch: str) -> None:
    """Each architecture maps [N,1,224,224] in [0,1] to [N,2] logits and learns from one step."""
    torch.manual_seed(0)
    model = create_model(arch)
    assert isinstance(model, FedscanNet)
    assert (model.arch, model.texture_dim, model.init) == (arch, 0, "random")
    model.train()
    images = torch.rand(2, 1, 224, 224)
    labels = torch.tensor([0, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    before = model.head.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.head.weight)
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_texture_features_join_the_embedding(arch: str) -> None:
    """With texture_dim > 0 the classifier sees [embedding, texture] and texture matters."""
    torch.manual_seed(0)
    model = create_model(arch, texture_dim=TEXTURE_DIM).eval()
    images = torch.rand(2, 1, 224, 224)
    texture = torch.rand(2, TEXTURE_DIM)
    with torch.no_grad():
        features = model.embed(images)
        assert features.shape == (2, model.num_features)
        assert model.head.in_features == model.num_features + TEXTURE_DIM
        logits = model(images, texture)
        assert torch.equal(logits, model.classify(features, texture))
        assert not torch.equal(logits, model(images, torch.zeros_like(texture)))
    with pytest.raises(ValueError, match="needs texture"):
        model(images)
    with pytest.raises(ValueError, match="no texture"):
        create_model("cnn2d")(images, texture)


def test_normalisation_is_inside_the_model() -> None:
    """The first layer applies our grayscale mean/std, and it is not part of the weights."""
    model = create_model("cnn2d")
    x = torch.full((1, 1, 4, 4), 0.8)
    assert torch.allclose(model.normalize(x), (x - GRAY_MEAN) / GRAY_STD)
    assert not any(k.startswith("normalize") for k in model.state_dict())


def test_texture_features_are_standardised_and_clipped_inside_the_model() -> None:
    """The classifier sees (t - TEXTURE_CENTER) / TEXTURE_SCALE clipped to +-TEXTURE_CLIP: the
    centre itself gives 0, one scale up gives 1, a far-off value stops at the clip. The constants
    are not weights (nothing to federate)."""
    model = create_model("cnn2d", texture_dim=TEXTURE_DIM)
    center = torch.tensor(TEXTURE_CENTER).unsqueeze(0)
    scale = torch.tensor(TEXTURE_SCALE).unsqueeze(0)
    assert len(TEXTURE_CENTER) == len(TEXTURE_SCALE) == TEXTURE_DIM
    assert torch.allclose(model.texture_normalize(center), torch.zeros(1, TEXTURE_DIM))
    assert torch.allclose(model.texture_normalize(center + scale), torch.ones(1, TEXTURE_DIM))
    far = model.texture_normalize(center + 100 * scale)
    assert torch.equal(far, torch.full((1, TEXTURE_DIM), TEXTURE_CLIP))
    assert not any(k.startswith("texture_normalize") for k in model.state_dict())


@pytest.mark.parametrize("mode", ["head", "last_stage"])
@pytest.mark.parametrize("arch", ARCHS)
def test_train_mode_step_changes_only_trainable_state(arch: str, mode: str) -> None:
    """A training step in a frozen mode changes exactly trainable_state_keys(mode), BN stats too."""
    torch.manual_seed(0)
    model = create_model(arch)
    model.set_train_mode(mode)
    model.train()
    trainable = model.trainable_state_keys(mode)
    assert trainable == model.trainable_state_keys()  # the current mode is the default
    grad_params = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grad_params == trainable & {n for n, _ in model.named_parameters()}
    if mode == "head":
        assert trainable == {"head.weight", "head.bias"}
    else:
        assert "head.weight" in trainable and len(trainable) > 2
        assert len(trainable) < len(model.state_dict())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = torch.nn.functional.cross_entropy(
        model(torch.rand(2, 1, 224, 224)), torch.tensor([0, 1])
    )
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable
    assert {"head.weight", "head.bias"} <= changed
    if mode == "last_stage" and arch in ("resnet18", "efficientnet_b0"):
        # the last stage's BatchNorm statistics move; the frozen stem's do not
        assert any(k.endswith("running_mean") for k in changed)
    assert model.training


def test_full_mode_restores_everything() -> None:
    """Going back to full unfreezes every parameter and puts every module in train mode."""
    model = create_model("resnet18")
    model.set_train_mode("head")
    model.set_train_mode("full")
    model.train()
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert model.trainable_state_keys("full") == set(model.state_dict())
    with pytest.raises(ValueError, match="full, last_stage, head"):
        model.set_train_mode("everything")
