"""MobileNet v1 (Howard et al. 2017, Table 1), the network of Jacob et al. 2018 Fig. 4.1 and whitepaper
Tables 2-7; not in torchvision. Depth multiplier alpha scales every layer's channels; ReLU6 as in the paper."""

from __future__ import annotations

from torch import nn

# (output channels, stride) of the 13 depthwise-separable blocks (Howard et al. Table 1)
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
           (512, 1), (1024, 2), (1024, 1)]


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, depth_multiplier: float = 1.0, dropout: float = 0.001) -> None:
        super().__init__()

        def ch(c: int) -> int:
            return max(8, int(c * depth_multiplier))

        layers = [_conv_bn_relu6(3, ch(32), 3, 2)]
        cin = ch(32)
        for cout, stride in _BLOCKS:
            layers += [_conv_bn_relu6(cin, cin, 3, stride, groups=cin), _conv_bn_relu6(cin, ch(cout), 1, 1)]
            cin = ch(cout)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.classifier(self.pool(self.features(x)).flatten(1))
