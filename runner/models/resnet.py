"""ResNet-20 for 32x32 (or 28x28) images, after He et al. 2016 §4.2 (CIFAR-10)."""

from __future__ import annotations

from torch import nn

from runner.models import MODELS


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        # Projection shortcut (option B) where the shape changes; identity elsewhere.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, in_channels: int, num_classes: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages, planes = [], width
        for stage in range(3):
            stride = 1 if stage == 0 else 2
            out_planes = width * 2**stage
            for block in range(blocks_per_stage):
                stages.append(BasicBlock(planes, out_planes, stride if block == 0 else 1))
                planes = out_planes
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


@MODELS.register("resnet20")
def resnet20(in_channels: int = 3, num_classes: int = 10, width: int = 16) -> nn.Module:
    """3 stages of 3 basic blocks (16/32/64 channels): about 0.27M parameters."""
    return ResNet(3, in_channels, num_classes, width)
