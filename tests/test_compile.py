"""QAT under ``torch.compile`` (issue 19 item 2): the prepared model compiles without graph breaks, and compiled
training steps keep exactly the eager quantizer state. On the CPU the vectorized fake quantizer steps aside while
compiling (its data-dependent branches would break the graph; inductor fuses torch's ops itself)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qat.compat.torch_private import compile_graph_breaks
from qat.quant.config import QuantConfig
from qat.quant.prepare import prepare
from qat.quant.schedule import QuantSchedule


@pytest.mark.slow
@pytest.mark.full  # about 30 s of compilation on 2 cores
def test_compiled_qat_steps_keep_the_eager_quantizer_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
    compiled_model = prepare(model, QuantConfig(), x[:1]).train()
    QuantSchedule(bn_freeze_step=0).apply(compiled_model, 0)
    eager = copy.deepcopy(compiled_model)
    torch.compiler.reset()
    compile_graph_breaks(clear=True)
    runs = [(torch.compile(compiled_model), torch.optim.SGD(compiled_model.parameters(), lr=0.01, momentum=0.9)),
            (eager, torch.optim.SGD(eager.parameters(), lr=0.01, momentum=0.9))]
    for _ in range(3):
        for forward, optimizer in runs:
            loss = nn.functional.cross_entropy(forward(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert compile_graph_breaks() == {}
    ours, theirs = compiled_model.state_dict(), eager.state_dict()
    quantizer_state = [k for k in theirs if k.endswith(("scale", "zero_point", "min_val", "max_val"))]
    assert quantizer_state and all(torch.equal(ours[k], theirs[k]) for k in quantizer_state)
    # weights: the compiled backward sums gradients in another order (measured: at most 1e-6 apart)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in theirs)
