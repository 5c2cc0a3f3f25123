"""Models the CLI trains: a small CNN for digits, an MLP, a CIFAR-style ResNet-20 and a small transformer over pixel
tokens.

Every model takes ``input_shape`` (C, H, W) and ``num_classes``, which the CLI reads from the data module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class SmallCNN(nn.Module):
    """Three 3×3 conv layers with BatchNorm, one pooling, two Linear layers (about 190 k weights for 8×8)."""

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        width: int = 32,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        channels, height, width_px = input_shape
        self.features = nn.Sequential(
            *_conv_bn(channels, width), nn.ReLU(inplace=True),
            *_conv_bn(width, 2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            *_conv_bn(2 * width, 2 * width), nn.ReLU(inplace=True),
        )  # fmt: skip
        flat = 2 * width * (height // 2) * (width_px // 2)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """A multi-layer perceptron on the flattened input."""

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        hidden: Sequence[int] = (256, 128),
    ) -> None:
        super().__init__()
        sizes = [int(torch.tensor(input_shape).prod()), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for cin, cout in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(cin, cout), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, stride), nn.ReLU(inplace=True), *_conv_bn(cout, cout))
        self.shortcut = (
            nn.Sequential(*_conv_bn(cin, cout, stride, kernel=1)) if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016): 3 stages of 3 basic blocks at widths w, 2w, 4w."""

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        width: int = 16,
        blocks: int = 3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(input_shape[0], width), nn.ReLU(inplace=True)]
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and block == 0 else 1))
                cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class BatchNormEverywhere(nn.Module):
    """A small 8×8-image classifier with a BatchNorm after a Conv and after a Linear, and a Conv and a Linear without
    one: every place a quantization export has to get BatchNorm right (the hardening tests and benchmark use it)."""

    def __init__(self, input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        channels, height, width_px = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(width * height * width_px, 32), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Linear(32, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class CNN1D(nn.Module):
    """The MNIST-1D paper's convolutional network (three 1-D convolutions, stride 2, then a linear classifier), with a
    BatchNorm after each convolution (so that quantization-aware training folds Conv1d + BatchNorm1d).

    Example:
        >>> CNN1D()(torch.zeros(2, 1, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(self, input_shape: Sequence[int] = (1, 40), num_classes: int = 10, width: int = 25) -> None:
        super().__init__()
        channels, length = input_shape
        layers: list[nn.Module] = []
        cin = channels
        for kernel in (5, 3, 3):
            layers += [nn.Conv1d(cin, width, kernel, stride=2, padding=1), nn.BatchNorm1d(width), nn.ReLU()]
            cin = width
            length = (length + 2 - kernel) // 2 + 1
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(width * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention written with four ``nn.Linear`` projections (``q``, ``k``, ``v``, ``o``), as Hugging
    Face's BERT and Llama write it: every projection is an ordinary layer the techniques see (an
    ``nn.MultiheadAttention`` reads its ``in_proj`` weight inside its kernel)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"`dim` ({dim}) must be a multiple of `heads` ({heads}).")
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        def split(t: Tensor) -> Tensor:  # (batch, heads, tokens, head_dim): as many heads as the projections hold
            return t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

        y = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.transpose(1, 2).flatten(2))


class TransformerBlock(nn.Module):
    """A pre-norm encoder block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))`` (GELU, ``mlp_ratio`` wide)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PixelTransformer(nn.Module):
    """A small transformer classifier that reads an image as a sequence of pixel tokens — a language model's anatomy
    (token and position embeddings, attention, MLPs, LayerNorm) on data that is here.

    Each pixel in [0, 1] becomes the token ``round(value · levels)`` (``levels + 1`` tokens; token 0, a blank pixel,
    is the embedding's ``padding_idx``: its row stays zero). Then position embeddings, ``depth`` pre-norm blocks
    (:class:`TransformerBlock`), a final LayerNorm, the mean over tokens and a Linear classifier.

    Example:
        >>> PixelTransformer((1, 8, 8), 10)(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        levels: int = 16,
    ) -> None:
        super().__init__()
        tokens = 1
        for size in input_shape:
            tokens *= int(size)
        self.levels = levels
        self.tokens = nn.Embedding(levels + 1, dim, padding_idx=0)
        self.positions = nn.Embedding(tokens, dim)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.register_buffer("position_ids", torch.arange(tokens), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        ids = (x.flatten(1) * self.levels).round().clamp(0, self.levels).long()
        h = self.blocks(self.tokens(ids) + self.positions(self.position_ids))
        return self.head(self.norm(h).mean(1))


def torchvision_classifier(
    name: str = "resnet18", input_shape: Sequence[int] = (3, 224, 224), num_classes: int = 10, **kwargs: object
) -> nn.Module:
    """A torchvision classification network (random weights) for the app's ``model=torchvision``: ``name`` is any of
    ``torchvision.models.list_models(torchvision.models)`` (``resnet18``, ``mobilenet_v2``, ``efficientnet_b0``…),
    ``kwargs`` its builder's own arguments.

    The first convolution is rebuilt for the data's channels when they are not 3 (grey digits), and a ResNet given
    inputs smaller than 64 pixels gets the usual small-input stem (3×3 convolution, stride 1, no max-pooling), as
    CIFAR ResNets do; other networks are left as torchvision builds them. Needs ``pip install ".[vision]"``.
    """
    try:
        import torchvision
    except ImportError as error:
        raise ImportError(f"model=torchvision needs torchvision: pip install '.[vision]' ({error})") from error
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    channels, *spatial = input_shape
    small = bool(spatial) and min(spatial) < 64 and hasattr(net, "conv1") and hasattr(net, "maxpool")
    first = next((n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and (channels != 3 or small):
        parent_name, _, attr = first.rpartition(".")
        parent, conv = net.get_submodule(parent_name), net.get_submodule(first)
        kernel, stride, padding = ((3, 3), (1, 1), (1, 1)) if small else (conv.kernel_size, conv.stride, conv.padding)
        setattr(
            parent, attr, nn.Conv2d(channels, conv.out_channels, kernel, stride, padding, bias=conv.bias is not None)
        )
    if small:
        net.maxpool = nn.Identity()
    return net
