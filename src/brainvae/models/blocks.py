"""Small convolutional building blocks shared by the architectures. Shapes are (B, C, H, W)."""

from __future__ import annotations

from torch import Tensor, nn


def conv_bn_act(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (stride 1 keeps H, W; stride 2 halves them) -> BatchNorm -> SiLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


def up_bn_act(c_in: int, c_out: int) -> nn.Sequential:
    """Transposed 4x4 conv doubling H, W -> BatchNorm -> SiLU."""
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class ResBlock(nn.Module):
    """Two 3x3 convs with a residual connection (He et al. 2016), BatchNorm + SiLU."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU(),
            nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.body(x))


class ConvEncoder(nn.Module):
    """(B, c_in, S, S) -> (B, channels[-1], S / 2**len(channels), S / 2**len(channels))."""

    def __init__(self, channels: tuple[int, ...], c_in: int = 1, res_blocks: int = 0):
        super().__init__()
        layers: list[nn.Module] = []
        prev = c_in
        for c in channels:
            layers.append(conv_bn_act(prev, c, stride=2))
            layers.extend(ResBlock(c) for _ in range(res_blocks))
            prev = c
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """(B, channels[-1], s, s) -> (B, c_out, s * 2**len(channels), ...), mirrored encoder, raw output."""

    def __init__(self, channels: tuple[int, ...], c_out: int = 1, res_blocks: int = 0):
        super().__init__()
        layers: list[nn.Module] = []
        rev = tuple(reversed(channels))
        for c_in, c in zip(rev, rev[1:] + (rev[-1],)):
            layers.extend(ResBlock(c_in) for _ in range(res_blocks))
            layers.append(up_bn_act(c_in, c))
        layers.append(nn.Conv2d(rev[-1], c_out, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
