"""One set of quantizer ranges across DDP ranks (issue 21, item 2; :mod:`qat.quant.range_sync`).

In-process: two simulated ranks (threads sharing a fake all-reduce) hold bit-identical ranges, equal to one
observer on the concatenated batch for the min/max-based observers; outside a synchronized block nothing is
communicated. Under torchrun (2 gloo processes, ``tests/ddp_worker.py --ranges``): QAT on different shards
leaves every rank with the same ranges, (S, Z) and running min/max, equal to a single process on the global
batches; the checkpoint holds them; an interrupted and resumed DDP run ends bit for bit where an uninterrupted
one does; without the synchronization the ranks' ranges differ (the control).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_distributed import WORKER, _env, _torchrun
from torch import nn

from qat.quant import fused, range_sync
from qat.quant.config import QuantConfig
from qat.quant.fake_quant import FakeQuantize
from qat.quant.observers import Observer, make_observer
from qat.quant.prepare import prepare
from qat.quant.scheme import QuantSpec
from qat.train.checkpoint import read_checkpoint_file
from qat.train.distributed import Runtime, wrap

SPEC = QuantSpec(bits=8, signed=False, symmetric=False)


def _model() -> nn.Module:
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                nn.Linear(4 * 8 * 8, 3))
    return prepare(float_model, QuantConfig(), torch.randn(1, 3, 8, 8))


def test_observers_say_how_ranks_combine() -> None:
    def sync(name: str, weights: bool) -> str | None:
        return make_observer(name, per_channel=weights, ch_axis=0, spec=SPEC, weights=weights).sync

    for name in ("ema", "minmax", "current"):
        assert sync(name, weights=False) == "extremes"
    assert sync("percentile", weights=False) == sync("mse", weights=False) == "mean"
    # stateless weight observers: a function of the weight tensor, which DDP keeps identical on every rank
    assert sync("current", weights=True) is None and sync("mse", weights=True) is None
    assert sync("ema", weights=True) == "extremes"  # a running weight range is combined like an activation's


def test_nothing_is_communicated_outside_a_synchronized_block(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a collective ran")

    monkeypatch.setattr(range_sync.dist, "all_reduce", refuse)
    model = _model()
    assert wrap(model, Runtime()) is model  # one process: no wrapper, no hooks
    model.train()
    model(torch.randn(2, 3, 8, 8))
    with range_sync.synchronized():  # no process group: a no-op
        assert not range_sync.active()
        model(torch.randn(2, 3, 8, 8))
    assert not range_sync.active()


class _FakeWorld:
    """An all-reduce between threads, one thread per simulated rank."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots: dict[int, torch.Tensor] = {}
        self.calls = 0

    def all_reduce(self, tensor: torch.Tensor, op: Any = None, group: Any = None) -> None:
        rank = int(threading.current_thread().name)
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        values = torch.stack([self.slots[r] for r in range(self.size)])
        reduced = values.amax(dim=0) if op == range_sync.dist.ReduceOp.MAX else values.sum(dim=0)
        self.barrier.wait()
        tensor.copy_(reduced)
        if rank == 0:
            self.calls += 1


def _ranks(world: _FakeWorld, body: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            body(rank)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            world.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,), name=str(r)) for r in range(world.size)]
    range_sync._STACK.append((None, world.size))  # what synchronized() does under a 2-process group
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        range_sync._STACK.pop()
    if errors:
        raise errors[0]


OBSERVERS = [("ema", False, True), ("ema", False, False), ("minmax", False, False), ("minmax", True, False),
             ("current", False, False), ("ema", True, False)]


@pytest.mark.parametrize(("name", "per_channel", "fused_path"), OBSERVERS)
def test_two_ranks_hold_the_global_batch_range(monkeypatch: pytest.MonkeyPatch, name: str, per_channel: bool,
                                               fused_path: bool) -> None:
    """Min/max-based observers: the min of the ranks' minima and max of their maxima is the global batch's range,
    so both ranks hold, bit for bit, what one process computes on the concatenated batches (fused EMA path
    included)."""
    world = _FakeWorld(2)
    monkeypatch.setattr(range_sync.dist, "all_reduce", world.all_reduce)
    spec = QuantSpec(bits=8, signed=False, symmetric=False, per_channel=per_channel, ch_axis=1)
    make = lambda: FakeQuantize(spec, make_observer(name, per_channel=per_channel, ch_axis=1, spec=spec))  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    shards = [[torch.randn(4, 3, 5, 5, generator=gen) * (1 + 3 * r) + r for r in range(2)] for _ in range(4)]
    ranks, single = [make(), make()], make()
    outputs: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def train(rank: int) -> None:
        for step in shards:
            outputs[rank].append(ranks[rank](step[rank]))

    with fused.unfused_path() if not fused_path else contextlib.nullcontext():
        assert fused.applies(ranks[0], shards[0][0]) == (fused_path and not per_channel)
        _ranks(world, train)
        expected = [single(torch.cat(step)) for step in shards]
    assert world.calls == len(shards)  # one all-reduce per quantizer and step
    for a, b in zip(ranks[0].state_dict().items(), ranks[1].state_dict().items(), strict=True):
        assert torch.equal(a[1], b[1]), a[0]
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0].state_dict()[key], value), key
    for step, out in enumerate(expected):  # every rank fake-quantized its shard on the global (S, Z)
        assert torch.equal(torch.cat([outputs[0][step], outputs[1][step]]), out)


@pytest.mark.parametrize("name", ["percentile", "mse"])
def test_percentile_and_mse_ranges_are_the_mean_of_the_ranks(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """No per-rank summary gives the global batch's percentile or MSE optimum: the ranks' batch ranges are
    averaged, identically on every rank; MSE's running mean then equals one observer seeing the shards in turn."""
    world = _FakeWorld(2)
    monkeypatch.setattr(range_sync.dist, "all_reduce", world.all_reduce)
    make: Callable[[], Observer] = lambda: make_observer(name, per_channel=False, ch_axis=0, spec=SPEC)  # noqa: E731
    gen = torch.Generator().manual_seed(1)
    shards = [[torch.randn(2, 64, generator=gen) * (1 + r) for r in range(2)] for _ in range(3)]
    ranks, alone = [make(), make()], [make(), make()]

    def observe(rank: int) -> None:
        for step in shards:
            ranks[rank](step[rank])

    _ranks(world, observe)
    assert torch.equal(ranks[0].min_val, ranks[1].min_val) and torch.equal(ranks[0].max_val, ranks[1].max_val)
    first = [alone[r].batch_range(shards[0][r]) for r in range(2)]
    if name == "percentile":  # running min/max of the averaged batch percentiles
        lows = [sum(alone[0].batch_range(s[r])[0] for r in range(2)) / 2 for s in shards]
        assert torch.allclose(ranks[0].min_val, torch.stack(lows).min())
    else:
        sequential = make()
        for step in shards:
            for shard in step:
                sequential(shard)
        assert torch.allclose(ranks[0].min_val, sequential.min_val, rtol=1e-6)
        assert torch.allclose(ranks[0].max_val, sequential.max_val, rtol=1e-6)
    assert first[0][0] != first[1][0]  # the shards' own ranges differ: the mean is not one rank's


# --- two processes under torchrun ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_ranges(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``tests/ddp_worker.py --ranges`` alone (global batches of 16) and under torchrun (2 ranks of 8)."""
    single, ddp = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ddp")
    alone = subprocess.run([sys.executable, str(WORKER), "--ranges", str(single)], cwd=single, env=_env(single),
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    run = _torchrun([str(WORKER), "--ranges", str(ddp)], ddp)
    assert run.returncode == 0, run.stderr[-3000:]
    load = lambda path: torch.load(path, weights_only=False)  # noqa: E731 - the test's own files
    return {"single": load(single / "ranges-rank0-of1.pt"), "ranks": [load(ddp / f"ranges-rank{r}-of2.pt")
                                                                      for r in range(2)], "dir": ddp}


QUANTIZER_BUFFERS = ("scale", "zero_point", "observer.min_val", "observer.max_val", "step", "offset")
SYNCED = ("ema", "minmax", "current", "percentile", "mse", "lsq_plus")


def _quantizer_keys(state: dict[str, torch.Tensor], acts_only: bool = False) -> list[str]:
    keys = [k for k in state if k.endswith(QUANTIZER_BUFFERS)]
    return [k for k in keys if k.startswith("act_quant.")] if acts_only else keys


@pytest.mark.slow
def test_ddp_ranks_hold_identical_ranges_equal_to_the_global_batch(ddp_ranges: dict[str, Any]) -> None:
    rank0, rank1 = ddp_ranges["ranks"]
    single = ddp_ranges["single"]
    assert not torch.equal(rank0["local_first_batch"], rank1["local_first_batch"])  # the shards differ
    for observer in SYNCED:
        for stage in ("calibrated", "trained"):
            a, b = rank0[f"{observer}/{stage}"], rank1[f"{observer}/{stage}"]
            assert _quantizer_keys(a, acts_only=True)
            for key in a:  # every parameter and buffer, weight quantizers included (no BN: same weights)
                assert torch.equal(a[key], b[key]), (observer, stage, key)
    # the global batch's min/max: a single process's ranges; learned steps (lsq_plus, initialised from min/max):
    # DDP averages their gradients, so they train as one process's do
    for observer in ("ema", "minmax", "current", "lsq_plus"):
        calibrated, trained = rank0[f"{observer}/calibrated"], rank0[f"{observer}/trained"]
        for key in calibrated:
            assert torch.equal(calibrated[key], single[f"{observer}/calibrated"][key]), (observer, key)
        for key in _quantizer_keys(trained):  # weights differ by the all-reduce's float summation order
            torch.testing.assert_close(trained[key].float(), single[f"{observer}/trained"][key].float(),
                                       rtol=1e-5, atol=1e-6, msg=f"{observer} {key}")


@pytest.mark.slow
def test_ddp_checkpoint_holds_the_ranges_every_rank_trained_with(ddp_ranges: dict[str, Any]) -> None:
    checkpoint = read_checkpoint_file(ddp_ranges["dir"] / "ckpt-ema-rank0-of2.pt")["model"]
    for rank in ddp_ranges["ranks"]:
        for key in _quantizer_keys(checkpoint, acts_only=True):
            assert torch.equal(checkpoint[key], rank["ema/trained"][key]), key


@pytest.mark.slow
def test_ddp_with_folded_batch_norm_and_per_rank_calibration(ddp_ranges: dict[str, Any]) -> None:
    """The app's flow: each rank calibrates on its shard; DDP's construction broadcasts rank 0's ranges and
    the synchronized steps keep them equal. Batch norm uses each rank's batch (not SyncBatchNorm), so the
    running statistics of the last step and the weight grids folded with the batch sigma (Jacob eq. 14) are
    the rank's own; DDP broadcasts rank 0's running statistics at the next forward."""
    rank0, rank1 = (r["bn/trained"] for r in ddp_ranges["ranks"])
    own = [k for k in rank0 if ".bn.running_" in k or (".weight_fq." in k and k.endswith(QUANTIZER_BUFFERS))]
    for key in rank0:
        if key not in own:
            assert torch.equal(rank0[key], rank1[key]), key
    assert _quantizer_keys(rank0, acts_only=True)


@pytest.mark.slow
def test_interrupted_ddp_run_resumes_exactly(ddp_ranges: dict[str, Any]) -> None:
    for rank in ddp_ranges["ranks"]:
        assert rank["resumed/from_step"] == 6  # mid-epoch 2 of 4-step epochs
        for key, value in rank["bn/trained"].items():
            assert torch.equal(rank["resumed/trained"][key], value), key


@pytest.mark.slow
def test_without_synchronization_ranks_keep_their_own_ranges(ddp_ranges: dict[str, Any]) -> None:
    """The control: the same QAT with range_sync.install disabled leaves the ranks with different activation
    ranges (each rank's last update used its own shard), which the checkpoint of rank 0 would not hold."""
    rank0, rank1 = (r["unsynced/trained"] for r in ddp_ranges["ranks"])
    assert any(not torch.equal(rank0[k], rank1[k]) for k in _quantizer_keys(rank0, acts_only=True))
