"""The training loop's memory format (train.channels_last): classification batches reach the model in the requested
layout, and the layout changes only the summation order, not the math."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qat.train.loop import classification_loss, train_epoch


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(8, 4))
        self.layouts: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return self.body(x)


def _train(memory_format: torch.memory_format) -> tuple[_Recorder, float]:
    torch.manual_seed(0)
    model = _Recorder().to(memory_format=memory_format)
    data = TensorDataset(torch.randn(32, 3, 12, 12), torch.randint(0, 4, (32,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _, loss = train_epoch(model, DataLoader(data, batch_size=8), optimizer, step=0, lr_fn=lambda _: 0.1,
                          loss=classification_loss(torch.device("cpu"), memory_format))
    return model, loss


def test_batches_reach_the_model_in_the_training_layout() -> None:
    nhwc, nhwc_loss = _train(torch.channels_last)
    nchw, nchw_loss = _train(torch.contiguous_format)
    assert nhwc.layouts == [True] * 4 and nchw.layouts == [False] * 4
    assert abs(nhwc_loss - nchw_loss) < 1e-4  # the same network and steps, another summation order
    for a, b in zip(nhwc.state_dict().values(), nchw.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
