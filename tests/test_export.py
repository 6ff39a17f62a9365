"""Exports with a manifest: round trip, corruption, bad input, nothing written on failure."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from conftest import TinyResidualNet

from qat.errors import QatError
from qat.export import MANIFEST_NAME, MANIFEST_SCHEMA, export_model, verify_export
from qat.export.manifest import fixed_input
from qat.intmodel.convert import convert
from qat.intmodel.graph import IntModel
from qat.quant.config import QuantConfig
from qat.quant.prepare import calibration_mode, prepare

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def int_model() -> IntModel:
    torch.manual_seed(0)
    x = torch.randn(16, 3, 16, 16)
    prepared = prepare(TinyResidualNet(), QuantConfig(act_observer="minmax"), x[:1])
    with calibration_mode(prepared), torch.no_grad():
        prepared(x)
    return convert(prepared)


def test_int8_onnx_export_round_trip(int_model, tmp_path) -> None:
    out = export_model("onnxruntime", int_model, tmp_path / "export", "smallnet-w8a8", seed=3)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["schema"] == MANIFEST_SCHEMA and manifest["model_id"] == "smallnet-w8a8"
    assert manifest["engine"] == "onnxruntime" and manifest["file"] == "smallnet-w8a8.onnx"
    assert manifest["sha256"] == hashlib.sha256((out / "smallnet-w8a8.onnx").read_bytes()).hexdigest()
    assert manifest["input_shape"] == [1, 3, 16, 16] and manifest["input_seed"] == 3
    assert manifest["precision"] == "int8" and manifest["bits"]["emulated_bits"] is False
    assert manifest["output_shape"] == [1, 10] and len(manifest["expected_output"]) == 10
    assert any(v != 0.0 for v in manifest["expected_output"])
    raw = torch.frombuffer(bytearray((out / "input.f32").read_bytes()), dtype=torch.float32)
    assert torch.equal(raw, fixed_input([1, 3, 16, 16], 3).reshape(-1))
    assert sorted(p.name for p in out.iterdir()) == ["input.f32", "manifest.json", "smallnet-w8a8.onnx"]
    result = verify_export(out)
    assert result["ok"] and result["max_abs_diff"] <= manifest["tolerance"]["atol"]


def test_float_onnx_export_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyResidualNet().eval()
    out = export_model("onnxruntime", model, tmp_path, "smallnet-float", example=torch.randn(1, 3, 16, 16))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["precision"] == "float32" and manifest["bits"]["min_bits"] == 32
    with torch.no_grad():
        expected = model(fixed_input([1, 3, 16, 16], 0))
    assert torch.allclose(torch.tensor(manifest["expected_output"]), expected.reshape(-1), atol=1e-5)
    assert verify_export(out)["ok"]


def test_corrupted_file_is_named(int_model, tmp_path) -> None:
    out = export_model("onnxruntime", int_model, tmp_path, "m")
    path = out / "m.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(QatError, match=rf"{path}: does not match the sha256 in its manifest"):
        verify_export(out)
    path.unlink()
    with pytest.raises(QatError, match=rf"{path}: does not exist"):
        verify_export(out)


def test_wrong_expected_output_is_detected(int_model, tmp_path) -> None:
    out = export_model("onnxruntime", int_model, tmp_path, "m")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["expected_output"][0] += 10 * manifest["tolerance"]["atol"] + 1.0
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(QatError, match=r"m.onnx: output differs from the manifest"):
        verify_export(out)


def test_bad_manifest_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(QatError, match="manifest.json: does not exist"):
        verify_export(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"schema": "other/9"}')
    with pytest.raises(QatError, match="has schema 'other/9', this qat reads 'qat.export/1'"):
        verify_export(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(QatError, match="is not valid JSON"):
        verify_export(tmp_path)


def test_unknown_or_unexportable_engine(int_model, tmp_path) -> None:
    with pytest.raises(QatError, match="latency.engine: unknown value 'tflite'"):
        export_model("tflite", int_model, tmp_path, "m")
    with pytest.raises(QatError, match="'torch_native_x86' has no export format"):
        export_model("torch_native_x86", int_model, tmp_path, "m")
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_nothing(int_model, tmp_path) -> None:
    wide = IntModel(nodes=[dataclasses.replace(n) for n in int_model.nodes], input_shape=int_model.input_shape)
    wide.nodes[1].out = dataclasses.replace(wide.nodes[1].out, bits=16, qmax=65535)
    with pytest.raises(QatError, match="16-bit unsigned activations do not fit"):
        export_model("onnxruntime", wide, tmp_path / "export", "m")
    assert not (tmp_path / "export").exists()
    with pytest.raises(QatError, match="export.example: a float module needs an example input"):
        export_model("onnxruntime", TinyResidualNet(), tmp_path / "export", "m")
    assert not (tmp_path / "export").exists()


def test_int_tolerance_is_one_output_lsb_or_the_float_tolerance_without_one() -> None:
    import copy

    from conftest import converted_mobilenet_v1

    from qat.export.bundle import FLOAT_RTOL, int_tolerance
    from qat.fidelity import output_lsb
    from qat.quant.config import QuantConfig

    int_model = converted_mobilenet_v1(QuantConfig(act_observer="minmax"), images=8)[0]
    atol, rtol = int_tolerance(int_model)
    assert atol == pytest.approx(output_lsb(int_model) * 1.001) and rtol == 0.0
    no_output_quantizer = copy.deepcopy(int_model)
    no_output_quantizer.nodes = no_output_quantizer.nodes[:-1]  # logits not dequantized from a quantized tensor
    assert int_tolerance(no_output_quantizer) == (FLOAT_RTOL, FLOAT_RTOL)  # never a zero tolerance
