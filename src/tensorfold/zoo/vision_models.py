"""The reference vision networks: a small digits CNN and the CIFAR ResNet-20 architecture.

Both are built without touching torch's global random generator: parameters are created on the meta
device and then initialised from a private, seeded generator (or loaded from weights).

>>> model = resnet20(seed=0)
>>> sum(p.numel() for p in model.parameters())
269722
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DigitsCNN(nn.Module):
    """conv16 - conv32 - maxpool - fc64 - fc10 for 1x8x8 digit images."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class PadShortcut(nn.Module):
    """ResNet 'option A' shortcut: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int, stride: int):
        super().__init__()
        self.extra_channels = extra_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        half = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        same = stride == 1 and in_planes == planes
        self.shortcut = nn.Identity() if same else PadShortcut(planes - in_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2): 3 stages of ``blocks`` BasicBlocks, 16/32/64 channels."""

    def __init__(self, blocks: int = 3, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def digits_cnn(seed: int | None = 0) -> DigitsCNN:
    """A :class:`DigitsCNN`, freshly initialised from ``seed`` (or left uninitialised with ``seed=None``)."""
    return _build(DigitsCNN, seed)


def resnet20(seed: int | None = 0, num_classes: int = 10) -> ResNet:
    """The CIFAR ResNet-20 (3 x 3 BasicBlocks, 0.27 M parameters), initialised from ``seed``."""
    return _build(lambda: ResNet(3, num_classes), seed)


def _build(factory, seed: int | None) -> nn.Module:
    with torch.device("meta"):
        model = factory()
    model = model.to_empty(device="cpu")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()
    if seed is not None:
        init_parameters(model, seed)
    return model


def init_parameters(model: nn.Module, seed: int) -> None:
    """He-normal init of convs, PyTorch's default uniform init of Linear layers, from a private generator."""
    gen = torch.Generator().manual_seed(int(seed))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=gen)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            bound = 1.0 / module.in_features ** 0.5
            nn.init.uniform_(module.weight, -bound, bound, generator=gen)
            if module.bias is not None:
                nn.init.uniform_(module.bias, -bound, bound, generator=gen)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()
