"""Range estimation: min/max, EMA of min/max (Jacob §3.1), percentile.

An observer sees tensors and keeps a running real range ``[min_val, max_val]`` (per tensor, or per channel
along ``ch_axis``). MSE-optimal clipping (Choukroun et al. 2019) lives in :mod:`qat.quant.mse`.

Under data parallelism (:mod:`qat.quant.range_sync`) each observer combines its batch range across the ranks
before updating (``sync``): min/max-based observers take the global batch's min and max, so every rank holds
the range a single process computes on the global batch.
"""

from __future__ import annotations

import torch
from torch import nn

from qat.errors import QatError, choice_error
from qat.quant import range_sync
from qat.quant.scheme import QuantSpec
from qat.quant.state import store_range


def reduce_dims(x: torch.Tensor, per_channel: bool, ch_axis: int) -> list[int]:
    if not per_channel:
        return list(range(x.dim()))
    axis = ch_axis % x.dim()
    return [d for d in range(x.dim()) if d != axis]


def channel_rows(x: torch.Tensor, axis: int) -> torch.Tensor | None:
    """``x`` as a (channels along ``axis``, everything else) view without a copy, when its memory allows (a weight
    along its output axis, contiguous or channels-last); ``None`` otherwise."""
    moved = x.movedim(axis % x.dim(), 0)
    if moved.is_contiguous():
        return moved.reshape(moved.shape[0], -1)
    if x.dim() == 4 and axis % 4 == 0 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return None


def aminmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.aminmax(x)`` over all elements, without the NCHW copy it makes of a channels-last tensor (the
    permuted view holds the same elements contiguously; min and max do not depend on the order)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        x = x.permute(0, 2, 3, 1)
    return torch.aminmax(x)


class Observer(nn.Module):
    """Base: buffers ``min_val``/``max_val`` (empty until the first observation).

    ``sync`` says how the ranks' batch ranges combine under :func:`qat.quant.range_sync.synchronized`
    (``"extremes"``: global min and max; ``"mean"``; ``None``: not communicated).
    """

    sync: str | None = "extremes"

    def __init__(self, per_channel: bool = False, ch_axis: int = 0) -> None:
        super().__init__()
        self.per_channel = per_channel
        self.ch_axis = ch_axis
        self.register_buffer("min_val", torch.tensor([]))
        self.register_buffer("max_val", torch.tensor([]))

    @property
    def initialized(self) -> bool:
        return self.min_val.numel() > 0

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        if not self.per_channel:
            return aminmax(x)  # one pass
        rows = channel_rows(x, self.ch_axis)
        if rows is not None:
            return torch.aminmax(rows, dim=1)  # one pass over a (channels, rest) view
        dims = reduce_dims(x, self.per_channel, self.ch_axis)
        return torch.amin(x, dim=dims), torch.amax(x, dim=dims)

    def observed_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's range; under :func:`qat.quant.range_sync.synchronized`, the ranks' ranges combined."""
        low, high = self.batch_range(x)
        return range_sync.combine(low, high, self.sync) if range_sync.active() else (low, high)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        for name in ("min_val", "max_val"):  # buffers start empty: take the saved shape
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class CurrentMinMaxObserver(Observer):
    """Min and max of the tensor seen last: for weights, whose range must follow training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        store_range(self, *self.observed_range(x))
        return x


class MinMaxObserver(Observer):
    """Running minimum and maximum over everything seen (post-training calibration)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.observed_range(x)
        if self.initialized:
            low, high = torch.minimum(low, self.min_val), torch.maximum(high, self.max_val)
        store_range(self, low, high)
        return x


class EmaMinMaxObserver(Observer):
    """Exponential moving average of batch min/max (Jacob et al. 2018 §3.1; Krishnamoorthi 2018 §3.2):
    m <- decay·m + (1 - decay)·batch, the first batch setting the range.

    Under data parallelism "batch" is the global batch: the ranks' batch minima and maxima are all-reduced
    (min of minima, max of maxima, :mod:`qat.quant.range_sync`) before the update, so every rank holds the EMA
    a single process computes on the concatenated global batches, bit for bit, rather than the EMA of a mean
    of per-rank ranges (which would shrink the range whenever the extremes sit on one rank).
    """

    def __init__(self, per_channel: bool = False, ch_axis: int = 0, decay: float = 0.99,
                 key: str = "quant.ema_decay") -> None:
        super().__init__(per_channel, ch_axis)
        if not 0.0 <= decay < 1.0:
            raise QatError(key, f"{decay} is outside [0, 1)", "use e.g. 0.99 or 0.999")
        self.decay = decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.observed_range(x)
        if self.initialized:
            low = self.decay * self.min_val + (1 - self.decay) * low
            high = self.decay * self.max_val + (1 - self.decay) * high
        store_range(self, low, high)
        return x


class PercentileObserver(MinMaxObserver):
    """Running min/max of the batch's lower/upper percentiles (clips outliers; whitepaper §3.1).

    Under data parallelism the ranks' batch percentiles are averaged (the global batch's percentile is not a
    function of per-rank percentiles; it lies between their minimum and maximum)."""

    sync = "mean"

    def __init__(self, per_channel: bool = False, ch_axis: int = 0, percentile: float = 99.99) -> None:
        super().__init__(per_channel, ch_axis)
        self.q = percentile / 100.0

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        x = x.movedim(self.ch_axis, 0).flatten(1) if self.per_channel else x.reshape(1, -1)
        if x.shape[1] > 2**24:  # torch.quantile's input limit
            x = x[:, torch.randperm(x.shape[1], device=x.device)[: 2**24]]
        low = torch.quantile(x, 1 - self.q, dim=1)
        high = torch.quantile(x, self.q, dim=1)
        return (low, high) if self.per_channel else (low[0], high[0])



OBSERVERS = {"current": CurrentMinMaxObserver, "minmax": MinMaxObserver, "ema": EmaMinMaxObserver,
             "percentile": PercentileObserver}
# mse lives in qat.quant.mse (it needs the grid), built on demand; lsq/lsq_plus are learned step sizes
# (qat.quant.lsq), whole quantizers that qat.quant.prepare builds instead of an observer
OBSERVER_NAMES = (*OBSERVERS, "mse", "lsq", "lsq_plus")


def make_observer(name: str, *, per_channel: bool, ch_axis: int, key: str = "quant.observer",
                  spec: QuantSpec | None = None, weights: bool = False, **options: float) -> Observer:
    """Build an observer by config name."""
    if name == "mse":
        from qat.quant.mse import MseObserver

        if spec is None:
            raise QatError(key, "the mse observer needs the tensor's quantization grid", "pass spec=")
        return MseObserver(spec, per_channel=per_channel, ch_axis=ch_axis, running=not weights)
    if name not in OBSERVERS:
        raise choice_error(key, name, OBSERVER_NAMES)
    cls = OBSERVERS[name]
    kwargs = {}
    if name == "ema" and "ema_decay" in options:
        kwargs["decay"] = options["ema_decay"]
    if name == "percentile" and "percentile" in options:
        kwargs["percentile"] = options["percentile"]
    observer = cls(per_channel=per_channel, ch_axis=ch_axis, **kwargs)
    if weights and name == "current":  # a function of the weight tensor, identical on every DDP rank
        observer.sync = None
    return observer
