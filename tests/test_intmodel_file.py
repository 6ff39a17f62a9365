"""The saved integer model: round trip through the file, and damaged or foreign files as clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from conftest import load_script
from torch import nn

from qat.errors import QatError
from qat.intmodel.convert import convert
from qat.intmodel.fixedpoint import multiplier_value
from qat.intmodel.graph import FORMAT_VERSION, IntModel
from qat.intmodel.reference import ReferenceExecutor
from qat.quant.config import QuantConfig
from qat.quant.prepare import calibration_mode, prepare

torch.set_num_threads(1)


class Residual(nn.Module):
    """conv+BN+ReLU, a residual add, concat, pooling and a classifier: every op that stores multipliers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))
        self.side = nn.Conv2d(8, 4, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.body(x) + x)
        return self.head(torch.cat([x, self.side(x)], 1))


@pytest.fixture(scope="module")
def int_model_and_input() -> tuple[IntModel, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    prepared = prepare(Residual(), QuantConfig(act_observer="minmax"), x[:1])
    with calibration_mode(prepared), torch.no_grad():
        prepared(x)
    return convert(prepared), x


def test_save_load_round_trip_gives_identical_outputs(int_model_and_input, tmp_path: Path) -> None:
    int_model, x = int_model_and_input
    loaded = IntModel.load(int_model.save(tmp_path / "int_model.pt"))
    assert [n.name for n in loaded.nodes] == [n.name for n in int_model.nodes]
    for a, b in zip(int_model.nodes, loaded.nodes, strict=True):
        assert a.op == b.op and a.inputs == b.inputs and a.out == b.out and a.attrs == b.attrs
        assert a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) and a.tensors[k].dtype == b.tensors[k].dtype
                   for k in a.tensors)
    before, after = ReferenceExecutor(int_model).run_layers(x), ReferenceExecutor(loaded).run_layers(x)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(ReferenceExecutor(int_model)(x), ReferenceExecutor(loaded)(x))


def test_add_and_cat_store_their_multipliers(int_model_and_input) -> None:
    int_model, _ = int_model_and_input
    add = next(n for n in int_model.nodes if n.op == "add")
    cat = next(n for n in int_model.nodes if n.op == "cat")
    assert add.attrs["left_shift"] == 20 and add.attrs["activation"] == "relu"
    assert add.attrs["clamp_min"] == add.out.zero_point  # the fused ReLU is a clamp at real 0.0
    for node in (add, cat):
        assert node.tensors["input_multiplier"].shape == (len(node.inputs),)
        assert all(2**30 <= int(m) < 2**31 for m in node.tensors["input_multiplier"])
    # TFLite ADD: input multipliers S_i / (2 max S) <= 1/2 (the larger input's is exactly 1/2 = 2^30 · 2^-31)
    values = [multiplier_value(int(m), int(n)) for m, n in zip(add.tensors["input_multiplier"],
                                                                add.tensors["input_shift"], strict=True)]
    assert max(values) == 0.5 and min(values) <= 0.5


def _write(path: Path, data: object) -> Path:
    buffer = io.BytesIO()
    torch.save(data, buffer)
    path.write_bytes(buffer.getvalue())
    return path


def test_truncated_file_is_a_clear_error(int_model_and_input, tmp_path: Path) -> None:
    int_model, _ = int_model_and_input
    path = int_model.save(tmp_path / "int_model.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(QatError, match=f"intmodel: {path} is not a readable integer-model file"):
        IntModel.load(path)


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "int_model.pt"
    path.write_bytes(b"\x00\x01 not a torch file at all" * 10)
    with pytest.raises(QatError, match=f"{path} is not a readable integer-model file"):
        IntModel.load(path)


def test_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "int_model.pt"
    path.write_bytes(b"")
    with pytest.raises(QatError, match=f"{path} is not a readable integer-model file"):
        IntModel.load(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QatError, match="does not exist"):
        IntModel.load(tmp_path / "nope.pt")


def test_old_format_version_is_a_clear_error(int_model_and_input, tmp_path: Path) -> None:
    int_model, _ = int_model_and_input
    data = int_model.to_dict()
    data["version"] = FORMAT_VERSION - 1
    path = _write(tmp_path / "old.pt", data)
    with pytest.raises(QatError, match=f"format version {FORMAT_VERSION - 1}, this qat reads {FORMAT_VERSION}"):
        IntModel.load(path)


def test_node_without_its_multipliers_names_the_node(int_model_and_input, tmp_path: Path) -> None:
    int_model, _ = int_model_and_input
    data = int_model.to_dict()
    add = next(n for n in data["nodes"] if n["op"] == "add")
    add["tensors"] = {k: v for k, v in add["tensors"].items() if k != "input_multiplier"}
    path = _write(tmp_path / "damaged.pt", data)
    with pytest.raises(QatError, match=f"{path}: node {add['name']} \\(add\\) lacks input_multiplier"):
        IntModel.load(path)


def test_dangling_input_names_the_node(int_model_and_input, tmp_path: Path) -> None:
    int_model, _ = int_model_and_input
    data = int_model.to_dict()
    data["nodes"][2]["inputs"] = ["ghost"]
    path = _write(tmp_path / "damaged.pt", data)
    with pytest.raises(QatError, match=f"node {data['nodes'][2]['name']} reads \\['ghost'\\], not earlier nodes"):
        IntModel.load(path)


def test_malformed_node_list_is_a_clear_error(int_model_and_input, tmp_path: Path) -> None:
    int_model, _ = int_model_and_input
    data = int_model.to_dict()
    del data["nodes"][1]["out"]
    path = _write(tmp_path / "damaged.pt", data)
    with pytest.raises(QatError, match=f"{path} has a damaged node list"):
        IntModel.load(path)


def test_unknown_op_in_file_names_the_node(int_model_and_input, tmp_path: Path) -> None:
    int_model, _ = int_model_and_input
    data = int_model.to_dict()
    data["nodes"][1]["op"] = "softmax"
    path = _write(tmp_path / "damaged.pt", data)
    with pytest.raises(QatError, match=f"node {data['nodes'][1]['name']} uses op 'softmax'"):
        IntModel.load(path)


def _explain_layer_script():  # type: ignore[no-untyped-def]
    return load_script("scripts/explain_layer.py")


def test_explain_layer_walks_through_a_saved_layer(int_model_and_input, tmp_path: Path, capsys) -> None:
    int_model, _ = int_model_and_input
    path = int_model.save(tmp_path / "int_model.pt")
    layer = next(n for n in int_model.nodes if n.op == "conv2d" and n.name != int_model.nodes[1].name)
    assert _explain_layer_script().main([str(path), "--layer", layer.name, "--channel", "2"]) == 0
    text = capsys.readouterr().out
    assert f"layer {layer.name}: conv2d" in text and "M0 = " in text
    assert "SaturatingRoundingDoublingHighMul(acc, M0)" in text and "(same)" in text


def test_explain_layer_rejects_an_unknown_layer(int_model_and_input, tmp_path: Path, capsys) -> None:
    int_model, _ = int_model_and_input
    path = int_model.save(tmp_path / "int_model.pt")
    assert _explain_layer_script().main([str(path), "--layer", "nope"]) == 2
    assert "--layer: no conv2d/linear layer named 'nope'" in capsys.readouterr().err
