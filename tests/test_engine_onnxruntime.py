"""ONNX Runtime QDQ engine against PyTorch's native int8 engine on the same integer model, and the engine registry."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from conftest import TinyResidualNet, for_this_host, onnx_layer_sessions
from torch import nn

from qat.engines import onnxruntime_qdq, registry
from qat.errors import QatError
from qat.fidelity import tie_aware_agreement
from qat.intmodel.convert import convert
from qat.intmodel.graph import IntModel
from qat.quant.config import QuantConfig
from qat.quant.prepare import calibration_mode, prepare

torch.set_num_threads(1)


def with_bn_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give an untrained model the BN running statistics of its data, as training would (else the eval-mode
    logits of a freshly initialized network are ~1e-9 and quantize to all zeros)."""
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None  # cumulative average
            bn.reset_running_stats()
    model.train()
    with torch.no_grad():
        for batch in x.split(16):
            model(batch)
    return model.eval()


def calibrated(model: nn.Module, config: QuantConfig, seed: int = 0) -> tuple[nn.Module, IntModel]:
    torch.manual_seed(seed)
    x = torch.randn(32, 3, 32, 32)
    model = with_bn_statistics(model, x)
    prepared = prepare(model, config, x[:1])
    with calibration_mode(prepared), torch.no_grad():
        prepared(x)
    prepared.eval()
    return prepared, convert(prepared)


@pytest.fixture(scope="module")
def mobilenet_v2() -> tuple[nn.Module, IntModel]:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10)
    return calibrated(model, for_this_host(QuantConfig(act_observer="minmax")))


@pytest.fixture(scope="module")
def resnet18() -> tuple[nn.Module, IntModel]:
    torch.manual_seed(0)
    return calibrated(torchvision.models.resnet18(num_classes=10),
                      for_this_host(QuantConfig(act_observer="minmax")))


def inputs(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def logit_codes(logits: torch.Tensor, int_model: IntModel) -> torch.Tensor:
    out = int_model.node(int_model.nodes[-1].inputs[0]).out
    return torch.round(logits / out.scale).long()


def _codes_as_int(t: torch.Tensor, signed: bool) -> np.ndarray:
    """torch_native's quint8 codes in the container ORT uses (signed grids are shifted by 128 there)."""
    codes = t.int_repr().numpy().astype(np.int32)
    return (codes - 128).astype(np.int8) if signed else codes.astype(np.uint8)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_int8_matches_torch_native_layer_by_layer_and_top1(arch: str, request) -> None:
    """Each op of the ORT graph, fed torch_native's input codes, reproduces torch_native's output codes; the whole
    model gives the same top-1."""
    _, int_model = request.getfixturevalue(arch)
    x = inputs()
    native = registry.build_int("torch_native_x86", int_model)
    values: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name, node_inputs, fn in native.steps:
            values[name] = fn(*(values[i] for i in node_inputs)) if node_inputs else fn(x)
    checked: dict[str, int] = {}
    for node, session in onnx_layer_sessions(int_model, onnxruntime_qdq.int_model_to_onnx(int_model),
                                             onnxruntime_qdq.session_options(1)):
        feeds = {i: _codes_as_int(values[i], int_model.node(i).out.signed) for i in node.inputs}
        ours = session.run(None, feeds)[0].astype(np.int32)
        theirs = _codes_as_int(values[node.name], node.out.signed).astype(np.int32)
        # within one LSB, not bit-exact: ORT requantizes with an fp32 multiplier S_in·S_w/S_out and rounds half to
        # even, fbgemm requantizes with its own fp32 multiplier and rounding, so a value on a rounding boundary
        # may land on either neighbour
        assert (np.abs(ours - theirs) <= 1).mean() >= 0.99, node.name
        checked[node.op] = checked.get(node.op, 0) + 1
    expected = {op: sum(n.op == op for n in int_model.nodes) for op in ("conv2d", "add", "max_pool", "linear")}
    assert checked == {**{op: n for op, n in expected.items() if n}, "avg_pool": 1, "flatten": 1}
    # end to end, those one-LSB differences accumulate over 20-50 layers of an untrained network (up to tens of
    # LSB in the logits, whose top classes are often within a few LSB): at most two of the 64 decisions differ
    ort_logits = registry.build_int("onnxruntime", int_model)(x)
    assert tie_aware_agreement(ort_logits, native(x)) >= 100 * 62 / 64


def op_counts(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_optimized_graph_runs_integer_kernels(arch: str, request, tmp_path) -> None:
    _, int_model = request.getfixturevalue(arch)
    onnxruntime_qdq.build_int(int_model, optimized_model_path=tmp_path / "optimized.onnx")
    counts = op_counts(tmp_path / "optimized.onnx")
    n = {op: sum(node.op == op for node in int_model.nodes) for op in ("conv2d", "add", "linear")}
    assert counts.get("QLinearConv", 0) == n["conv2d"]
    assert counts.get("QLinearAdd", 0) == n["add"]
    assert counts.get("QGemm", 0) + counts.get("QLinearMatMul", 0) == n["linear"]
    assert counts.get("QLinearGlobalAveragePool", 0) == 1
    # no float compute is left: one QuantizeLinear at the input, one DequantizeLinear for the logits
    assert not {"Conv", "Gemm", "MatMul", "Add", "GlobalAveragePool"} & set(counts)
    assert counts["QuantizeLinear"] == 1 and counts["DequantizeLinear"] == 1


def test_four_bit_model_runs_in_8bit_container_and_is_flagged(tmp_path) -> None:
    torch.manual_seed(0)
    _, int_model = calibrated(torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10),
                              QuantConfig(weight_bits=4, act_bits=4, act_observer="minmax"))
    engine = onnxruntime_qdq.build_int(int_model, optimized_model_path=tmp_path / "optimized.onnx")
    assert engine.emulated_bits and int_model.min_bits == 4
    counts = op_counts(tmp_path / "optimized.onnx")  # the integer clamps keep the int8 kernels fused
    assert counts.get("QLinearConv", 0) == sum(node.op == "conv2d" for node in int_model.nodes)
    assert "Conv" not in counts and counts["Clip"] > 0
    # every intermediate tensor stays on its 4-bit grid inside the 8-bit container (integer Clip, Jacob §2.4)
    model = onnx.load_from_string(engine.onnx_bytes)
    quantized = [n for n in int_model.nodes if n.out is not None]
    for node in quantized:
        elem = onnx.TensorProto.INT8 if node.out.signed else onnx.TensorProto.UINT8
        model.graph.output.append(onnx.helper.make_tensor_value_info(node.name, elem, None))
    session = ort.InferenceSession(model.SerializeToString(), onnxruntime_qdq.session_options(1))
    outputs = session.run([n.name for n in quantized], {onnxruntime_qdq.INPUT_NAME: inputs(8).numpy()})
    for node, codes in zip(quantized, outputs, strict=True):
        assert node.out.qmin <= int(codes.min()) and int(codes.max()) <= node.out.qmax, node.name
    assert any(int(codes.max()) == node.out.qmax == 15 for node, codes in zip(quantized, outputs, strict=True))


def test_activations_wider_than_8_bits_are_refused(mobilenet_v2) -> None:
    _, int_model = mobilenet_v2
    wide = IntModel(nodes=[dataclasses.replace(n) for n in int_model.nodes], input_shape=int_model.input_shape)
    first = wide.nodes[1]
    first.out = dataclasses.replace(first.out, bits=16, qmax=65535)
    with pytest.raises(QatError, match=rf"latency.engine: {first.name}: 16-bit unsigned activations do not fit"):
        onnxruntime_qdq.build_int(wide)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    model = TinyResidualNet(act=nn.ReLU6).eval()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):  # non-trivial statistics so that folding matters
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
    return model


def test_float_onnxruntime_equals_torch_float() -> None:
    model = tiny_net()
    engine = registry.build_float("onnxruntime", model, torch.randn(1, 3, 32, 32))
    x = inputs(5)  # another batch size than the example: the batch dimension is dynamic
    with torch.no_grad():
        expected = model(x)
    assert expected.abs().max() > 0.1
    assert torch.allclose(engine(x), expected, atol=1e-4, rtol=1e-4)
    assert registry.build_float("torch_eager", model, x[:1])(x).sub(expected).abs().max() < 1e-4


def test_threads_are_fixed_in_the_session_options() -> None:
    options = onnxruntime_qdq.session_options(3)
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    with pytest.raises(QatError, match="latency.threads"):
        onnxruntime_qdq.session_options(0)


def test_engine_info_names_and_versions() -> None:
    info = registry.engine_info("onnxruntime")  # elementwise_kernels: tests/test_mobilenet_v3_engines.py
    assert info == {"engine": "onnxruntime", "engine_version": ort.__version__,
                    "elementwise_kernels": info["elementwise_kernels"]}
    assert registry.engine_info("torch_native_qnnpack")["engine"] == "torch_native_qnnpack"
    assert registry.engine_info("torch_eager")["engine_version"] == torch.__version__.split("+")[0]


def test_unknown_engine_is_a_clear_error(mobilenet_v2) -> None:
    with pytest.raises(QatError, match=r"latency.engine: unknown value 'tensorrt' \(valid choices: executorch_xnnpack"):
        registry.build_int("tensorrt", mobilenet_v2[1])


def test_engine_without_the_precision_is_a_clear_error(mobilenet_v2) -> None:
    with pytest.raises(QatError, match="'torch_eager' has no int8 path"):
        registry.build_int("torch_eager", mobilenet_v2[1])
    with pytest.raises(QatError, match="'torch_native_x86' has no float path"):
        registry.build_float("torch_native_x86", tiny_net(), torch.randn(1, 3, 32, 32))


def test_missing_package_or_adapter_is_reported_not_replaced(monkeypatch, mobilenet_v2) -> None:
    monkeypatch.setitem(registry.ENGINES, "onnxruntime",
                        registry.EngineEntry("onnxruntime", "qat.engines.onnxruntime_qdq", "qat_no_such_package",
                                             ("float", "int8")))
    with pytest.raises(QatError, match="needs the Python package 'qat_no_such_package', which is not installed"):
        registry.build_int("onnxruntime", mobilenet_v2[1])
    assert not registry.is_installed("onnxruntime")
    monkeypatch.setitem(registry.ENGINES, "onnxruntime",
                        registry.EngineEntry("onnxruntime", "qat.engines.no_such_adapter", "onnxruntime",
                                             ("float", "int8")))
    with pytest.raises(QatError, match="adapter qat.engines.no_such_adapter is not part of this qat"):
        registry.build_int("onnxruntime", mobilenet_v2[1])
