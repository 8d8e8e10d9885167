"""replace_norm_act on a torchvision-style ResNet defined here (torchvision is not a dependency)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from opsearch.nn import replace_norm_act


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one `relu` module used after bn1 and after the residual sum."""

    expansion = 1

    def __init__(self, cin, cout, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """torchvision ResNet layout: conv1/bn1/relu/maxpool stem, layer1..2, avgpool, fc."""

    def __init__(self, num_classes=5, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, 2, bias=False), nn.BatchNorm2d(2 * width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2, down))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class BNReLU(nn.Module):
    """What a folded slot must compute if the layer is BN-ReLU: BN then ReLU."""

    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn(x))


class Recorder:
    """A norm_act factory that builds BN(+ReLU) and records what each slot asked for."""

    def __init__(self):
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, c, act):
        self.calls.append((c, act))
        return BNReLU(c) if act else nn.BatchNorm2d(c)


def _bn_count(model):
    return sum(isinstance(m, nn.BatchNorm2d) and not isinstance(p, BNReLU)
               for p in model.modules() for m in p.children())


def test_resnet_same_function_when_the_layer_is_bn_relu():
    """Folding every bn+relu pair into a BN-ReLU layer must compute exactly the original network:
    a ReLU dropped after the residual sum or applied twice would change the output."""
    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    factory = Recorder()
    new = replace_norm_act(model, factory).eval()
    # stem bn1, block1 bn1, block2 bn1 are followed by relu; bn2s and the shortcut BN are not
    assert sorted(factory.calls) == sorted([(8, True), (8, True), (8, False), (16, True), (16, False),
                                            (16, False)])
    torch.testing.assert_close(new(x), expected)
    assert isinstance(new, fx.GraphModule)
    # the shared relu module still applies after the residual sums
    assert sum(1 for n in new.graph.nodes if n.op == "call_module" and n.target.endswith("relu")) == 2


def test_functional_relu_and_silu_are_folded_too():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(4)
            self.act = nn.SiLU()

        def forward(self, x):
            y = F.relu(self.bn(self.conv(x)))
            return self.act(self.bn2(y)) + y.relu()

    factory = Recorder()
    new = replace_norm_act(M(), factory)
    assert sorted(factory.calls) == [(4, True), (4, True)]
    ops = [n.target for n in new.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    assert F.relu not in ops and "act" not in ops  # folded into the layers
    assert "relu" in ops  # y.relu() reads the layer output and a sum, not a BN: kept


def test_with_real_layers_no_batchnorm_left_and_training_works():
    torch.manual_seed(0)
    for layer in ("evonorm_s0", "bn_relu"):
        model = replace_norm_act(TinyResNet(), layer)
        assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
        out = model(torch.randn(4, 3, 16, 16))
        out.sum().backward()
        assert out.shape == (4, 5) and torch.isfinite(out).all()


def test_untraceable_model_falls_back_to_module_order():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            x = self.features(x)
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace this
                x = x * 2
            return F.relu(self.bn(x))

    factory = Recorder()
    model = Dynamic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = replace_norm_act(model, factory)
    assert new is model
    assert isinstance(model.features[2], nn.Identity)  # the ReLU after the BN in the Sequential
    assert factory.calls == [(4, True), (4, False), (4, True)]
    assert any("does not trace" in str(w.message) for w in caught)
    assert new(torch.randn(1, 3, 4, 4)).shape == (1, 4, 4, 4)


def test_a_bare_batchnorm_is_replaced_by_the_no_activation_companion():
    factory = Recorder()
    bn = nn.BatchNorm2d(3)
    assert replace_norm_act(bn, factory) is not bn
    assert factory.calls == [(3, False)]
