"""QAT under ``torch.compile`` (issue 19 item 2): the prepared model compiles without graph breaks, and compiled
training steps keep exactly the eager quantizer state. On the CPU the vectorized fake quantizer steps aside while
compiling (its data-dependent branches would break the graph; inductor fuses torch's ops itself)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import EngineSettings
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qat.compat.torch_private import compile_graph_breaks
from qat.quant.config import QuantConfig
from qat.quant.prepare import prepare
from qat.quant.schedule import QuantSchedule
from qat.train.distributed import Runtime


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


@pytest.mark.slow
@pytest.mark.full  # about 30 s of compilation on 2 cores
def test_train_compile_trains_like_eager_and_says_so(tmp_path: Path) -> None:
    """``train.compile=true``: the engine trains a compiled forward (QAT, schedule hook included) to the eager
    run's weights and quantizer state, and the record's training block says it compiled."""
    from qat.train.engine import Task, describe, fit
    from qat.train.loop import OptimConfig, classification_loss

    images, labels = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 4
    loader = DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(2))
    states = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        prepared = prepare(model, QuantConfig(), images[:1]).train()
        schedule = QuantSchedule(bn_freeze_step=0)
        fit(prepared, loader, Task(classification_loss), train=EngineSettings(compile=compiled), optim=OptimConfig(),
            seed=0, phase="qat", epochs=2, lr=0.01, checkpoint=tmp_path / f"ckpt-{compiled}.pt",
            before_step=lambda step, m=prepared, s=schedule: s.apply(m, step))
        states[compiled] = prepared.state_dict()
        assert describe(EngineSettings(compile=compiled), Runtime(), loader)["compiled"] is compiled
    eager, ours = states[False], states[True]
    quantizer_state = [k for k in eager if k.endswith(("scale", "zero_point", "min_val", "max_val"))]
    assert quantizer_state and all(torch.equal(ours[k], eager[k]) for k in quantizer_state)
    assert all(torch.allclose(ours[k], eager[k], atol=1e-5) for k in eager)
