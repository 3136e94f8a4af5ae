"""The small networks prunekit trains itself, defined once for every family.

* :class:`SmallCNN` (``cnn`` in vision recipes): 4 convolutions + 2 linear layers with BatchNorm, the
  training-time pruning workhorse on Fashion-MNIST.
* :class:`FastCNN` (``fast-cnn`` in data recipes): two strided convolutions and a linear head, for the data
  pruning grids that train hundreds of models.
* :class:`MLP` (``mlp`` / ``linear``): feature vectors and text embeddings.
* :class:`SmallResNet`, :class:`ConcatNet`, :class:`TinyViT`: residual adds, concatenation and attention for
  channel coupling and ViT pruning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """conv(32)-conv(32)-pool-conv(64)-conv(64)-pool-fc(128)-fc(10) with BatchNorm."""

    def __init__(self, num_classes: int = 10, width: int = 32, in_ch: int = 1, size: int = 28):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * (size // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def embed(self, x):
        """The penultimate features (128 after ReLU)."""
        return self.classifier[:-1](self.features(x))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet for 28x28 inputs: stem, three stages of ``blocks`` basic blocks (widths w, 2w, 4w), pool, fc."""

    def __init__(self, num_classes: int = 10, width: int = 16, blocks: int = 1, in_ch: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class ConcatNet(nn.Module):
    """A small CNN whose two branches are concatenated (tests channel coupling through ``torch.cat``)."""

    def __init__(self, num_classes: int = 10, width: int = 8, in_ch: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, groups=width), nn.BatchNorm2d(width), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        h = self.stem(x)
        return self.fc(self.mix(torch.cat([self.a(h), self.b(h)], 1)).mean((2, 3)))


class TinyViT(nn.Module):
    """A small ViT for 28x28 inputs: 7x7 patches (16 tokens) + class token, ``depth`` pre-norm blocks."""

    def __init__(self, num_classes: int = 10, dim: int = 64, depth: int = 4, heads: int = 4, patch: int = 7,
                 in_ch: int = 1, image: int = 28):
        super().__init__()
        self.patch = nn.Conv2d(in_ch, dim, patch, patch)
        n = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.blocks(t))[:, 0])



class FastCNN(nn.Module):
    """Two strided convolutions and a linear head (~0.3 MFLOP per 28x28 image): the data-pruning grids train
    hundreds of these on a CPU. ``embed`` is the pooled feature vector."""

    def __init__(self, in_ch: int, num_classes: int, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(2 * width * 16, num_classes)

    def embed(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.pool(x).flatten(1)

    def forward(self, x):
        return self.fc(self.embed(x))


class MLP(nn.Module):
    """Flatten, one hidden ReLU layer of ``hidden`` units (0: a linear probe), a linear head."""

    def __init__(self, d_in: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.ReLU()) if hidden else nn.Flatten()
        self.fc = nn.Linear(hidden or d_in, num_classes)

    def embed(self, x):
        return self.body(x)

    def forward(self, x):
        return self.fc(self.body(x))
