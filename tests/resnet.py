"""A ResNet-18-layout CNN written here (torchvision does not import on these machines).

Same module names and wiring as ``torchvision.models.resnet18``: ``conv1``/``bn1`` stem,
``layer1..layer4`` of two ``BasicBlock``s (3x3 conv-BN-ReLU-3x3 conv-BN, residual add,
``downsample`` = 1x1 conv + BN where the shape changes), global average pooling, ``fc``.
Only the widths are tiny, so tests run in seconds. Used as ``--arch tests/resnet.py:factory``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet-18 layout (2, 2, 2, 2 basic blocks) with widths `widths`."""

    def __init__(self, widths=(4, 4, 6, 8), classes: int = 5, blocks=(2, 2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layer = [BasicBlock(cin, w, stride)] + [BasicBlock(w, w) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_tiny() -> ResNet:
    """The factory: ``--arch tests/resnet.py:resnet_tiny``."""
    return ResNet()


def trained_state(seed: int = 0, images: int = 64, size: int = 8) -> dict[str, Tensor]:
    """A state dict with non-trivial BatchNorm running statistics and affine parameters."""
    torch.manual_seed(seed)
    model = resnet_tiny()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(images, 3, size, size))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
