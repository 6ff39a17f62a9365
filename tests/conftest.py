"""Shared test helpers. Add fixtures below; keep the device markers as they are (other tests import them).

``requires_cuda`` skips a test (shown as skipped, with the reason) where no CUDA device is visible, like
Lightning's ``RunIf``; ``DEVICES`` / the ``device`` fixture run a test on the CPU always and on CUDA when there
is one.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device a test should run on: ``cpu``, and ``cuda`` (skipped without a GPU)."""
    return torch.device(request.param)


def load_script(relative: str, name: str | None = None):  # type: ignore[no-untyped-def]
    """The project file ``relative`` (e.g. ``scripts/demo_tables.py``) imported as a module under ``name`` (its
    stem by default), so a test calls its functions directly."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def load_eval_app(name: str = "qat_eval_app"):  # type: ignore[no-untyped-def]
    """``experiments/eval.py`` imported as a module under ``name`` (its functions are called directly)."""
    return load_script("experiments/eval.py", name)


def converted_mobilenet_v1(config, images: int = 24):  # type: ignore[no-untyped-def]
    """A seeded MobileNet v1 (x0.25, 4 classes, 32 px) prepared with ``config``, calibrated on ``images`` random
    images and converted: (int model, loader of those images, simulated logits, predictions, targets)."""
    from torch.utils.data import DataLoader, TensorDataset

    from qat.intmodel.convert import convert
    from qat.models.registry import build_model
    from qat.quant.prepare import calibration_mode, prepare
    from qat.train.loop import predict

    torch.manual_seed(0)
    model = prepare(build_model("mobilenet_v1", width_mult=0.25, num_classes=4, resolution=32), config,
                    torch.randn(1, 3, 32, 32))
    batch = torch.randn(images, 3, 32, 32)
    with calibration_mode(model), torch.no_grad():
        model(batch)
    loader = DataLoader(TensorDataset(batch, torch.randint(0, 4, (images,))), batch_size=8)
    sim_logits, sim_pred, targets = predict(model, loader)
    return convert(model), loader, sim_logits, sim_pred, targets


def for_this_host(config):  # type: ignore[no-untyped-def]
    """``config`` (a :class:`qat.quant.config.QuantConfig`) on this host's deployment target, as ``target=auto``
    gives it to a run (:func:`qat.targets.constrain`): 7-bit weights on x86 without AVX-512 VNNI, where fbgemm and
    ONNX Runtime sum u8·s8 pairs in saturating int16. Tests comparing real x86 engines with the simulation or the
    reference use it, so that they hold on AVX2-only and VNNI hosts alike."""
    from qat.targets import constrain, resolve

    return constrain(config, resolve("auto")[0])[0]


# --- tiny runs: the apps' overrides that make a whole run take seconds on 2 cores ------------------------------

TINY_CLASSIFICATION: dict[str, object] = {
    "experiment": "demo", "model.width_mult": 0.35, "data.demo.num_classes": 4, "data.demo.train_per_class": 24,
    "data.demo.val_per_class": 8, "data.batch_size": 16, "train.float_epochs": 2, "train.qat_epochs": 1,
    "latency.repeats": 5, "latency.warmup": 1, "latency.min_time_s": 0, "train.threads": 1,
    "latency.eval_engines": "[reference,onnxruntime]"}
"""``experiments/run.py``: MobileNet v2 x0.35 on 4 demo classes (96 training images: 6 batches of 16); fidelity on
the reference and ONNX Runtime (the demo preset adds ExecuTorch, whose lowering tests run where they need it)."""

TINY_DETECTION: dict[str, object] = {
    "experiment": "detect_demo", "model.width_mult": 0.35, "model.resolution": 64, "data.synthetic.train_images": 48,
    "data.synthetic.val_images": 16, "data.synthetic.image_size": 64, "data.synthetic.num_categories": 3,
    "data.batch_size": 8, "data.eval_batch_size": 16, "train.float_epochs": 2, "train.qat_epochs": 1,
    "latency.repeats": 5, "latency.warmup": 1, "latency.min_time_s": 0, "train.threads": 1,
    "target.diagnostic_images": 0}
"""``experiments/detect.py``: SSDLite MobileNet v2 x0.35 at 64 px on 3 synthetic categories (6 batches of 8)."""


def overrides(base: dict[str, object], changes: dict[str, object] | None = None) -> list[str]:
    """Hydra overrides ``key=value`` of ``base`` updated with ``changes`` (each key once; a change to ``None``
    drops the key, leaving the config's own value)."""
    merged = {**base, **(changes or {})}
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in merged.items()
            if value is not None]


# --- tiny networks ------------------------------------------------------------------------------------------

class TinyResidualNet(torch.nn.Module):
    """Conv-BN-ReLU stem, pooling (``pool``, max-pool 2 by default), a residual block (conv-BN-``act``-conv-BN,
    add, ReLU), global average pool, linear to 10 classes: the integer model's common ops at 8 channels."""

    def __init__(self, pool: torch.nn.Module | None = None, act: type[torch.nn.Module] = torch.nn.ReLU) -> None:
        from torch import nn

        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = pool or nn.MaxPool2d(2)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act(),
                                   nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        return self.head(torch.relu(x + self.block(x)))


def onnx_layer_sessions(int_model, onnx_bytes: bytes, options):  # type: ignore[no-untyped-def]
    """Every node of ``int_model`` but its quantize/dequantize boundary as an ONNX Runtime session of its own, cut
    from the model's QDQ graph (``onnx_bytes``): ``(node, session)`` pairs for layer-by-layer comparisons fed
    another executor's input codes."""
    import onnx
    import onnxruntime as ort

    extractor = onnx.utils.Extractor(onnx.load_from_string(onnx_bytes))
    for node in int_model.nodes:
        if node.op in ("quantize", "dequantize"):
            continue
        sub = extractor.extract_model(list(node.inputs), [node.name])
        yield node, ort.InferenceSession(sub.SerializeToString(), options)


@dataclass
class EngineSettings:
    """The training engine's ``TrainSettings`` (:mod:`qat.train.engine`) for tests that call ``fit`` directly."""

    checkpoint_every_steps: int = 0
    keep_best: bool = False
    amp: str = "none"
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"


@pytest.fixture(params=["fused_cpu", "aten"])
def fake_quant_kernel(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Each CPU fake-quantize path of :mod:`qat.quant.cpu_kernel`: qat's fused C++ kernel (it must build unless
    ``QAT_CPU_KERNEL=aten`` is set, which skips it with the reason) and the ATen ops."""
    from qat.quant import cpu_kernel

    if request.param == "aten":
        with cpu_kernel.aten_path():
            yield request.param
        return
    built_cpu_kernel()
    yield request.param


def built_cpu_kernel():  # type: ignore[no-untyped-def]
    """``torch.ops.qat_cpu``: skips the test (with the reason) under ``QAT_CPU_KERNEL=aten``; otherwise the kernel
    must build, and the test fails with the reason if it does not."""
    from qat.quant import cpu_kernel

    if cpu_kernel.choice() == "aten":
        pytest.skip(f"{cpu_kernel.ENV_VAR}=aten: the fused CPU kernel is not built")
    ops = cpu_kernel.ops()
    assert ops is not None, cpu_kernel.describe()
    return ops


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    """Replace ``owner.name`` (for the test's duration) by a wrapper that appends to the returned list per call."""
    calls: list[int] = []
    inner = getattr(owner, name)

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls
