"""Proxy architectures: forward/backward with real layers, act=False slots, odd channel counts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from opsearch import layers, registry
from opsearch.errors import UserError
from opsearch.trainers import architectures

ARCHS = ("resnet", "mobilenetv2", "efficientnet")


def _forward_backward(model: nn.Module, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    out = model(x)
    assert out.shape == (x.shape[0], num_classes)
    assert torch.isfinite(out).all()
    out.logsumexp(dim=1).mean().backward()
    # v0/v1 exist on every compiled layer but only the graphs that use them get gradients
    missing = [n for n, p in model.named_parameters()
               if p.grad is None and n.rsplit(".", 1)[-1] not in ("v0", "v1")]
    assert not missing, f"no gradient reached {missing[:5]}"
    return out


def test_registered():
    assert set(ARCHS) <= set(registry.architectures.names())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", ["bn_relu", "evonorm_b0", "evonorm_s0", "gn_relu", "relu_only"])
def test_forward_backward_with_known_layers(arch, layer):
    torch.manual_seed(0)
    model = architectures.build(arch, layers.norm_act(layer), 10, 1, width=4, depth=1)
    _forward_backward(model, torch.randn(4, 1, 8, 8), 10)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", ["evonorm_s0", "gn_relu"])
def test_odd_channel_counts_and_input_sizes(arch, layer):
    # width 5: channel counts 5, 8, 10, 13, 15, 20, 30 ... (odd, prime): the group rule must cope
    torch.manual_seed(0)
    model = architectures.build(arch, layers.norm_act(layer), 7, 3, width=5, depth=1)
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert any(c % 2 == 1 for c in convs)
    _forward_backward(model, torch.randn(3, 3, 11, 11), 7)


@pytest.mark.parametrize("arch, layer", [(a, "evonorm_s0") for a in ARCHS]
                         + [("resnet", "gn_relu"), ("mobilenetv2", "ln_relu")])
def test_batch_independent_layers_keep_samples_independent(arch, layer):
    # In training mode too: nothing in the architecture mixes samples; only batch stats could.
    torch.manual_seed(0)
    model = architectures.build(arch, layers.norm_act(layer), 10, 1, width=4, depth=1).train()
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(model(x)[:2], model(x[:2]), atol=1e-5)


def test_batch_dependent_layer_does_mix_samples_in_training():
    torch.manual_seed(0)
    model = architectures.build("resnet", layers.norm_act("bn_relu"), 10, 1, width=4, depth=1).train()
    x = torch.randn(4, 1, 8, 8)
    assert not torch.allclose(model(x)[:2], model(x[:2]), atol=1e-5)


class _Tagged(nn.Module):
    def __init__(self, channels: int, act: bool):
        super().__init__()
        self.act = act
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        y = x * self.weight.view(1, -1, 1, 1)
        return torch.relu(y) if self.act else y


def _tagged(c: int, act: bool) -> nn.Module:
    return _Tagged(c, act)


def test_slots_without_activation_get_act_false():
    resnet = architectures.build("resnet", _tagged, 10, 1, width=4, depth=1)
    blocks = [m for m in resnet.modules() if isinstance(m, architectures.BasicBlock)]
    assert len(blocks) == 3
    for block in blocks:
        assert block.na1.act and not block.na2.act
    projections = [b.shortcut[1] for b in blocks if isinstance(b.shortcut, nn.Sequential)]
    assert len(projections) == 2 and not any(p.act for p in projections)
    assert resnet.stem[1].act
    for arch in ("mobilenetv2", "efficientnet"):
        net = architectures.build(arch, _tagged, 10, 1, width=4, depth=1)
        for block in (m for m in net.modules() if isinstance(m, architectures.InvertedResidual)):
            slots = [m for m in block.body if isinstance(m, _Tagged)]
            assert not slots[-1].act, "linear bottleneck must be act=False"
            assert all(s.act for s in slots[:-1])


def test_residual_branches_start_at_zero_scale():
    resnet = architectures.build("resnet", layers.norm_act("evonorm_s0"), 10, 1, width=4, depth=1)
    for block in (m for m in resnet.modules() if isinstance(m, architectures.BasicBlock)):
        assert torch.count_nonzero(block.na2.weight) == 0
        assert torch.count_nonzero(block.na1.weight) == block.na1.weight.numel()
    plain = architectures.build("resnet", _tagged, 10, 1, width=4, depth=1, zero_init_residual=False)
    assert all(torch.count_nonzero(b.na2.weight) > 0
               for b in plain.modules() if isinstance(b, architectures.BasicBlock))


def test_efficientnet_has_squeeze_excitation_and_mobilenet_not():
    eff = architectures.build("efficientnet", _tagged, 10, 1, width=4, depth=1)
    mob = architectures.build("mobilenetv2", _tagged, 10, 1, width=4, depth=1)
    assert any(isinstance(m, architectures.SqueezeExcite) for m in eff.modules())
    assert not any(isinstance(m, architectures.SqueezeExcite) for m in mob.modules())


def test_width_and_depth_change_the_network():
    small = architectures.build("resnet", _tagged, 10, 1, width=4, depth=1)
    deep = architectures.build("resnet", _tagged, 10, 1, width=4, depth=3)
    wide = architectures.build("resnet", _tagged, 10, 1, width=8, depth=1)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(deep) > count(small) and count(wide) > count(small)


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="unknown option"):
        architectures.build("resnet", _tagged, 10, 1, widht=4)
    with pytest.raises(UserError, match="width and depth"):
        architectures.build("mobilenetv2", _tagged, 10, 1, depth=0)
    with pytest.raises(UserError, match="known: .*efficientnet"):
        architectures.build("resnet50", _tagged, 10, 1)
