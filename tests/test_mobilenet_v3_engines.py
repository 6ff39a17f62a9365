"""MobileNet v3 on the real int8 engines (issue 18 item 2): ONNX Runtime's QDQ graph and ExecuTorch-XNNPACK run
hardswish, hardsigmoid and the squeeze-excite mul of a briefly trained v3-small layer by layer within 1 LSB of the
integer reference and agree with it on >= 99% of predictions; each engine's record says, read back from what the
engine really runs (ORT's optimized graph, the lowered ExecuTorch program), which ops run on integer kernels and
which in float between dequantize and quantize. An engine that is not installed skips its tests."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import onnx_layer_sessions
from test_mobilenet_v3_integer import _trained_v3_small

from qat import fidelity
from qat.errors import QatError
from qat.intmodel.convert import convert
from qat.intmodel.elementwise import squeeze_excite_probe
from qat.intmodel.graph import IntModel
from qat.intmodel.reference import ReferenceExecutor

warnings.filterwarnings("ignore", message=".*experimental.*")

V3_OPS = ("hardswish", "hardsigmoid", "mul")
# Per op, fed the reference's own input codes: the largest difference allowed, as in tests/test_engine_onnxruntime.py
# and tests/test_engine_executorch.py: both engines requantize conv/linear/mul with an fp32 multiplier where the
# reference uses (M0, n) (ORT pools as the reference does: tests/test_pooling.py), and quantize a
# float hardswish/hardsigmoid where it looks the simulation's codes up in a table;
# each differs only near rounding ties
TOLERANCE_LSB = 1


@pytest.fixture(scope="module")
def v3():  # type: ignore[no-untyped-def]
    """The trained v3-small of tests/test_mobilenet_v3_integer.py (prepared, batch maker) and its integer model."""
    torch.set_num_threads(1)
    prepared, batch = _trained_v3_small()
    return prepared, batch, convert(prepared)


def _count(int_model: IntModel) -> dict[str, int]:
    return {op: sum(n.op == op for n in int_model.nodes) for op in ("conv2d", "linear", *V3_OPS)}


def _agreement(engine, v3) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Top-1 agreement of ``engine`` with the reference and with the simulated model on 4 × 64 seeded images."""
    prepared, batch, int_model = v3
    reference = ReferenceExecutor(int_model)
    generator = torch.Generator().manual_seed(1)
    with_reference = with_simulation = total = 0
    for _ in range(4):
        x, _ = batch(64, generator)
        predicted = engine(x).argmax(1)
        with torch.no_grad():
            with_simulation += int((prepared(x).argmax(1) == predicted).sum())
        with_reference += int((reference(x).argmax(1) == predicted).sum())
        total += x.shape[0]
    return with_reference / total, with_simulation / total


# --- ONNX Runtime ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ort_adapter():  # type: ignore[no-untyped-def]
    pytest.importorskip("onnxruntime")
    from qat.engines import onnxruntime_qdq

    return onnxruntime_qdq


def test_onnxruntime_layer_by_layer_against_the_reference(v3, ort_adapter) -> None:  # type: ignore[no-untyped-def]
    """Each node of the QDQ graph, run alone by ORT on the reference's input codes, reproduces the reference's
    codes within 1 LSB."""
    import numpy as np

    _, batch, int_model = v3
    x, _ = batch(32, torch.Generator().manual_seed(2))
    values = ReferenceExecutor(int_model).run_layers(x)
    largest: dict[str, int] = {}
    for node, session in onnx_layer_sessions(int_model, ort_adapter.int_model_to_onnx(int_model),
                                             ort_adapter.session_options(1)):
        feeds = {i: values[i].to(torch.int64).numpy().astype(np.int8 if int_model.node(i).out.signed else np.uint8)
                 for i in node.inputs}
        ours = torch.from_numpy(session.run(None, feeds)[0].astype(np.int64))
        largest[node.op] = max(largest.get(node.op, 0), int((ours - values[node.name].to(torch.int64)).abs().max()))
    assert set(V3_OPS) <= set(largest)
    assert max(largest.values()) <= TOLERANCE_LSB, largest


def test_onnxruntime_predicts_as_the_reference(v3, ort_adapter) -> None:  # type: ignore[no-untyped-def]
    with_reference, with_simulation = _agreement(ort_adapter.build_int(v3[2]), v3)
    assert with_reference >= 0.99 and with_simulation >= 0.99, (with_reference, with_simulation)


def test_onnxruntime_records_which_v3_ops_run_in_float(v3, ort_adapter, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Read from ORT's optimized graph: the SE mul fuses into QLinearMul on uint8 grids; ORT has no integer
    hardswish/hardsigmoid, so those run in float between DequantizeLinear and QuantizeLinear (HardSwish expanded
    into HardSigmoid and Mul); the record says so, and nothing else of the model is float."""
    import onnx

    int_model = v3[2]
    assert not any(n.out.signed for n in int_model.nodes if n.out is not None)  # this host's uint8 grids
    ort_adapter.build_int(int_model, optimized_model_path=tmp_path / "optimized.onnx")
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    n = _count(int_model)
    hardswish = "float HardSigmoid, Mul between DequantizeLinear and QuantizeLinear"
    hardsigmoid = "float HardSigmoid between DequantizeLinear and QuantizeLinear"
    assert ort_adapter.elementwise_execution(int_model, optimized) == {
        "hardswish": {hardswish: n["hardswish"]}, "hardsigmoid": {hardsigmoid: n["hardsigmoid"]},
        "mul": {"integer QLinearMul": n["mul"]}}
    ops: dict[str, int] = {}
    for node in optimized.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    # the float ops are exactly those: one DQ/Q pair around each hardswish and hardsigmoid, plus the model's ends
    assert ops["HardSigmoid"] == n["hardswish"] + n["hardsigmoid"] and ops["Mul"] == n["hardswish"]
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 1 + n["hardswish"] + n["hardsigmoid"]
    assert ops["QLinearConv"] == n["conv2d"] and not {"Conv", "Gemm", "MatMul", "Add"} & set(ops)
    # the record: uint8 as here; on int8 grids ORT 1.32 leaves the mul in float too, and says so
    probe = squeeze_excite_probe(signed=True)
    signed = ort_adapter.elementwise_execution(probe, ort_adapter.optimized_graph(ort_adapter.int_model_to_onnx(probe)))
    assert signed["mul"] == {"float Mul between DequantizeLinear and QuantizeLinear": 1}
    info, record = fidelity.build_engine("onnxruntime", int_model, threads=1)[1], ort_adapter.engine_info()
    assert info["elementwise_kernels"] == record["elementwise_kernels"] == (
        f"hardswish: {hardswish}; hardsigmoid: {hardsigmoid}; mul: integer QLinearMul on uint8 grids, float Mul "
        "between DequantizeLinear and QuantizeLinear on int8 grids")


# --- ExecuTorch-XNNPACK ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def et_adapter():  # type: ignore[no-untyped-def]
    pytest.importorskip("executorch")
    from qat.engines import executorch_xnnpack

    return executorch_xnnpack


@pytest.fixture(scope="module")
def et_lowered(v3, et_adapter):  # type: ignore[no-untyped-def]
    """The v3-small lowered with every layer's output exposed (probe program)."""
    return et_adapter.lower_int(v3[2], probe=True)


def test_executorch_layer_by_layer_against_the_reference(v3, et_adapter, et_lowered) -> None:  # type: ignore[no-untyped-def]
    """Each layer's int8 codes from the XNNPACK program against the reference's node fed XNNPACK's own inputs."""
    _, batch, int_model = v3
    x, _ = batch(32, torch.Generator().manual_seed(2))
    outputs = et_adapter.ExecutorchProgram(et_lowered.pte, threads=1)(x)
    probed = et_adapter.QdqReference(int_model, probe=True).probed_layers()
    assert len(outputs) == 1 + len(probed)
    codes = {}  # the int8 container's codes back on the integer model's grid (unsigned grids were shifted by -128)
    for (name, grid), out in zip(probed, outputs[1:], strict=True):
        shift = 0 if int_model.node(name).out.signed else 128
        codes[name] = torch.round(out / grid.scale) + grid.zero_point + shift
    reference = ReferenceExecutor(int_model)
    largest: dict[str, int] = {}
    for node in int_model.nodes:
        if node.op in ("quantize", "dequantize"):
            continue
        ours = reference.run_node(node.name, *(codes[i] for i in node.inputs)).to(torch.int64)
        largest[node.op] = max(largest.get(node.op, 0), int((ours - codes[node.name].to(torch.int64)).abs().max()))
    assert set(V3_OPS) <= set(largest)
    assert max(largest.values()) <= TOLERANCE_LSB, largest


def test_executorch_predicts_as_the_reference(v3, et_adapter, et_lowered) -> None:  # type: ignore[no-untyped-def]
    program = et_adapter.ExecutorchProgram(et_lowered.pte, threads=1)
    with_reference, with_simulation = _agreement(lambda x: program(x)[0], v3)
    assert with_reference >= 0.99 and with_simulation >= 0.99, (with_reference, with_simulation)


def test_executorch_records_what_xnnpack_runs(v3, et_adapter, et_lowered, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Read from the lowered program: one XNNPACK delegate holds everything (nothing in portable kernels); mul on
    XNNPACK's int8 kernel, hardswish on its fp32 kernel and hardsigmoid in fp32 (XNNPACK has none) as an add with a
    fused clamp and a divide, the only fp32 nodes; the record (engine_info, via fidelity) says so."""
    int_model = v3[2]
    n = _count(int_model)
    assert et_lowered.delegates == 1
    assert "XNNHardswish(qint8->qint8)" not in et_lowered.xnn_nodes
    assert et_lowered.xnn_nodes["XNNMultiply(qint8,qint8->qint8)"] == n["mul"]
    assert et_lowered.gemms("qint8") == n["conv2d"] + n["linear"] and et_lowered.gemms("fp32") == 0
    floats = {k: v for k, v in et_lowered.xnn_nodes.items() if k.endswith("->fp32)") and "Convert" not in k}
    assert floats == {"XNNHardswish(fp32->fp32)": n["hardswish"], "XNNAdd(fp32,fp32->fp32)": n["hardsigmoid"],
                      "XNNDiv(fp32,fp32->fp32)": n["hardsigmoid"]}
    record = et_adapter.elementwise_execution(int_model, et_lowered)
    assert record["hardswish"] == ("delegated to XNNPACK in fp32 (XNNHardswish(fp32->fp32), ExecuTorch's "
                                   "partitioner admits hardswish in fp32 only) between XNNPACK's int8->fp32 and "
                                   "fp32->int8 converts")
    assert record["mul"] == "delegated to XNNPACK's int8 kernel XNNMultiply(qint8,qint8->qint8)"
    assert record["hardsigmoid"].startswith("delegated to XNNPACK in fp32 (XNNAdd(fp32,fp32->fp32), "
                                            "XNNDiv(fp32,fp32->fp32)")
    # the record's engine info comes from the program the engine built: the lowering above stands in for a second
    # one (40-90 s on a 2-core host; the probe program differs only in its extra outputs)
    monkeypatch.setattr(et_adapter, "lower_int", lambda model, probe=False: et_lowered)
    info = fidelity.build_engine("executorch_xnnpack", int_model, threads=1)[1]
    assert info["elementwise_kernels"] == et_adapter.engine_info()["elementwise_kernels"]
    assert info["elementwise_kernels"] == "; ".join(f"{op}: {record[op]}" for op in V3_OPS) + \
        "; nothing in portable kernels"


def test_executorch_refuses_an_unexpected_fp32_node(v3, et_adapter, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """fp32 inside the delegate is admitted only as hardswish and the hardsigmoid decomposition: any other fp32
    node (here: hardswish, once it is no longer expected) stops the lowering in one line instead of running."""
    monkeypatch.setattr(et_adapter, "_FP32_NODES", {"hardsigmoid": et_adapter._FP32_NODES["hardsigmoid"]})
    with pytest.raises(QatError, match=r"^engine: XNNPACK runs fp32 nodes .*XNNHardswish\(fp32->fp32\)") as error:
        et_adapter.lower_int(squeeze_excite_probe(signed=True))
    assert "\n" not in error.value.one_line()
