"""x86 16-bit pair accumulation (qat.intmodel.saturation) and deployment targets (qat.targets).

Pass on AVX2-only and VNNI hosts alike: fbgemm's AVX2 kernels are selected with FBGEMM_ENABLE_INSTRUCTIONS=AVX2
in a subprocess (a no-op where the host has no more than AVX2)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qat.errors import QatError
from qat.intmodel.graph import IntNode, TensorQ
from qat.intmodel.saturation import LayerSaturation, count_overflows, saturated_accumulator
from qat.quant.config import LayerOverride, QuantConfig
from qat.targets import TARGETS, auto_target, constrain, resolve

ROOT = Path(__file__).resolve().parents[1]


def one_by_one_conv(weight_code: int, channels: int = 4, outputs: int = 2) -> IntNode:
    """A 1x1 conv with every weight code ``weight_code``, symmetric weights, zero bias."""
    return IntNode("conv", "conv2d", ["x"], TensorQ(1.0, 0, 8, False, 0, 255),
                   attrs={"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "clamp_min": 0, "clamp_max": 255},
                   tensors={"weight": torch.full((outputs, channels, 1, 1), weight_code, dtype=torch.int32),
                            "weight_zero_point": torch.zeros(outputs, dtype=torch.int32),
                            "bias": torch.zeros(outputs, dtype=torch.int32)})


UNSIGNED = TensorQ(1.0, 0, 8, False, 0, 255)


def test_saturated_sums_of_a_hand_computed_case() -> None:
    # codes 255 and weights 127: each pair is 2·255·127 = 64770, clipped to 32767; 4 channels = 2 pairs
    x = torch.full((1, 4, 1, 1), 255, dtype=torch.int32)
    acc = saturated_accumulator(x, one_by_one_conv(127), UNSIGNED)
    assert acc.shape == (1, 2, 1, 1) and acc.flatten().tolist() == [2 * 32767, 2 * 32767]
    exact = saturated_accumulator(x, one_by_one_conv(63), UNSIGNED)  # 2·255·63 = 32130 fits: exact sum
    assert exact.flatten().tolist() == [4 * 255 * 63] * 2
    # one code below the edge: 255·127 + 1·127 = 32512 fits, so only the pair of two 255s clips
    mixed = torch.tensor([255, 255, 255, 1], dtype=torch.int32).reshape(1, 4, 1, 1)
    assert saturated_accumulator(mixed, one_by_one_conv(127), UNSIGNED)[0, 0, 0, 0] == 32767 + 32512


def test_diagnostic_flags_exactly_the_overflowing_outputs() -> None:
    x = torch.zeros(2, 4, 2, 2, dtype=torch.int32)
    x[0, :, 0, 0] = 255  # one spatial position of image 0 overflows both pairs
    x[1, :2, 1, 1] = 255  # image 1: only the first pair at one position
    stats = LayerSaturation()
    count_overflows(x, one_by_one_conv(127), UNSIGNED, stats)
    assert stats.pair_sums == 2 * 2 * 2 * 4  # images x outputs x pairs x positions
    assert stats.overflowing == 2 * 2 + 2 * 1 and stats.outputs_affected == 2 * 2
    assert stats.max_abs_pair == 64770
    seven_bit = LayerSaturation()
    count_overflows(x, one_by_one_conv(63), UNSIGNED, seven_bit)
    assert seven_bit.overflowing == 0 and seven_bit.outputs_affected == 0


EMULATION_VS_FBGEMM = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_reference import MODELS, _integers, _quantized, calibrated
    from qat.engines import torch_native
    from qat.intmodel.convert import convert
    from qat.intmodel.reference import ReferenceExecutor
    from qat.quant.config import QuantConfig
    prepared, x = calibrated(MODELS["tiny"], QuantConfig(act_observer="minmax"), n=8)
    int_model = convert(prepared)
    exact = ReferenceExecutor(int_model)
    emulated = ReferenceExecutor(int_model, accumulation="pair16")
    engine = torch_native.build(int_model, "fbgemm")
    values = exact.run_layers(x)
    q_of = {{n.name: n.out for n in int_model.nodes}}
    worst_exact = worst_emulated = 0
    with torch.inference_mode():
        for (_, inputs, fn), node in zip(engine.steps, int_model.nodes):
            if node.op not in ("conv2d", "linear"):
                continue
            theirs = _integers(fn(*[_quantized(values[i], q_of[i]) for i in inputs]), node.out)
            mine = emulated.run_node(node.name, values[inputs[0]]).to(torch.int64)
            worst_emulated = max(worst_emulated, int((theirs - mine).abs().max()))
            worst_exact = max(worst_exact, int((theirs - values[node.name].to(torch.int64)).abs().max()))
    print(worst_exact, worst_emulated)
""")


def test_emulation_follows_fbgemm_avx2_kernels_within_one_lsb() -> None:
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    result = subprocess.run([sys.executable, "-c", EMULATION_VS_FBGEMM.format(tests=str(ROOT / "tests"))],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    worst_exact, worst_emulated = (int(v) for v in result.stdout.split()[-2:])
    assert worst_exact > 10  # the tiny model's stem overflows 16-bit pairs: fbgemm's AVX2 kernel leaves Jacob eq. 7
    assert worst_emulated <= 1  # the emulation follows it to the usual 1-LSB rounding difference


@pytest.mark.parametrize(("flags", "machine", "expected"), [
    (["avx2", "fma", "avx512f", "avx512_vnni"], "x86_64", "x86_vnni"),
    (["avx2", "fma"], "x86_64", "x86_avx2"),
    (["avx2", "avx_vnni"], "x86_64", "x86_avx2"),  # fbgemm has no AVX-VNNI kernels
    (["neon", "asimddp"], "aarch64", "arm"),
    ([], "riscv64", "generic"),
])
def test_auto_target_from_given_flags(flags: list[str], machine: str, expected: str) -> None:
    assert auto_target(flags, machine)[0] == expected
    assert resolve("auto", flags, machine)[0].name == expected


def test_avx2_target_narrows_the_grid_the_pairs_overflow_on() -> None:
    config = QuantConfig(overrides=[LayerOverride("fc", weight_bits=8)])
    weights7, constraints = constrain(config, TARGETS["x86_avx2"], "weights7")
    assert weights7.weight_bits == 7 and weights7.overrides[0].weight_bits == 7 and weights7.act_bits == 8
    assert [c.key for c in constraints] == ["quant.weight_bits", "quant.overrides[fc].weight_bits"]
    acts7, _ = constrain(config, TARGETS["x86_avx2"], "acts7")
    assert acts7.act_bits == 7 and acts7.weight_bits == 8
    assert constrain(config, TARGETS["x86_vnni"]) == (config, [])


@pytest.mark.parametrize(("name", "config", "grid", "message"), [
    ("x86_avx2", QuantConfig(act_symmetric=True), "acts7", r"^quant.act_symmetric: .*needs unsigned"),
    ("arm", QuantConfig(weight_symmetric=False), "weights7", r"^quant.weight_symmetric: .*need symmetric weights"),
    ("x86_vnni", QuantConfig(act_bits=12), "weights7", r"^quant.act_bits: 12-bit grids cannot run"),
    ("x86_avx2", QuantConfig(), "weights6", r"^target.avx2_grid: unknown value 'weights6'"),
])
def test_recipes_a_target_cannot_run_are_one_line(name: str, config: QuantConfig, grid: str, message: str) -> None:
    with pytest.raises(QatError, match=message) as caught:
        constrain(config, TARGETS[name], grid)
    assert "\n" not in str(caught.value)


def test_unknown_target_lists_the_valid_ones() -> None:
    with pytest.raises(QatError, match=r"^target.name: unknown value 'x86'.*x86_avx2"):
        resolve("x86")


AVX2_TARGET_ENGINES = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_reference import MODELS, calibrated
    from qat.fidelity import build_engine
    from qat.intmodel.convert import convert
    from qat.quant.config import QuantConfig
    from qat.targets import TARGETS, constrain
    config = constrain(QuantConfig(act_observer="minmax"), TARGETS["x86_avx2"])[0]
    prepared, x = calibrated(MODELS["tiny"], config, n=16)
    int_model = convert(prepared)
    lsb = int_model.nodes[-2].out.scale
    reference = build_engine("reference", int_model, 1)[0](x)
    for name in ("torch_native_x86", "torch_native_fbgemm", "onnxruntime"):
        diff = (build_engine(name, int_model, 1)[0](x) - reference).abs() / lsb
        print(name, float(diff.max()))
""")


def _logit_lsb_differences(env: dict[str, str]) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", AVX2_TARGET_ENGINES.format(tests=str(ROOT / "tests"))],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return {line.split()[0]: float(line.split()[1]) for line in result.stdout.strip().splitlines()}


def test_avx2_target_makes_a_saturating_model_exact_on_every_engine() -> None:
    """The tiny model's 8-bit stem overflows 16-bit pairs; under target=x86_avx2 (7-bit weights) the diagnostic
    is zero, the pair16 emulation equals the exact reference, and torch_native (x86, fbgemm) and ONNX Runtime
    follow the reference to rounding, with the host's own kernels and with fbgemm's AVX2 kernels."""
    from test_reference import MODELS, calibrated

    from qat.fidelity import build_engine
    from qat.intmodel.convert import convert
    from qat.intmodel.saturation import diagnose

    prepared, x = calibrated(MODELS["tiny"], QuantConfig(act_observer="minmax"), n=16)
    assert diagnose(convert(prepared), [x]).as_dict()["overflowing_pair_sums"] > 0  # saturation-prone at 8 bits
    config = constrain(QuantConfig(act_observer="minmax"), TARGETS["x86_avx2"])[0]
    prepared, x = calibrated(MODELS["tiny"], config, n=16)
    int_model = convert(prepared)
    report = diagnose(int_model, [x]).as_dict()
    assert report["overflowing_pair_sums"] == 0 and report["layers_flagged"] == [] and report["pair_sums"] > 0
    assert torch.equal(build_engine("reference_pair16", int_model, 1)[0](x), build_engine("reference", int_model,
                                                                                            1)[0](x))
    for env in ({**os.environ}, {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}):
        differences = _logit_lsb_differences(env)
        assert set(differences) == {"torch_native_x86", "torch_native_fbgemm", "onnxruntime"}
        # per layer the kernels round within 1 LSB of the reference; over the tiny model's layers a few LSB
        assert max(differences.values()) <= 4, (env.get("FBGEMM_ENABLE_INSTRUCTIONS"), differences)


def test_auto_follows_fbgemm_restricted_to_avx2(monkeypatch: pytest.MonkeyPatch) -> None:
    from qat.targets import accumulates_in_pairs, can_saturate

    vnni = ["avx2", "avx512f", "avx512_vnni"]
    assert resolve("auto", vnni, "x86_64")[0].name == "x86_vnni"
    assert not accumulates_in_pairs("torch_native_x86", vnni, "x86_64")
    assert accumulates_in_pairs("onnxruntime", ["avx2"], "x86_64") and not accumulates_in_pairs("onnxruntime",
                                                                                                ["avx2"], "aarch64")
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")
    target, why = resolve("auto", vnni, "x86_64")
    assert target.name == "x86_avx2" and "FBGEMM_ENABLE_INSTRUCTIONS=AVX2" in why
    assert accumulates_in_pairs("torch_native_x86", vnni, "x86_64")
    assert not accumulates_in_pairs("onnxruntime", vnni, "x86_64")  # the variable is fbgemm's alone
    assert can_saturate(QuantConfig()) and not can_saturate(constrain(QuantConfig(), target)[0])
    assert not can_saturate(QuantConfig(act_bits=7)) and can_saturate(QuantConfig(act_bits=7, act_symmetric=True))


FLAGGED_VS_LEFT = textwrap.dedent("""
    import importlib.util, sys
    sys.path.insert(0, {tests!r})
    from test_reference import MODELS, calibrated
    from qat.intmodel.convert import convert
    from qat.quant.config import QuantConfig
    from qat.targets import TARGETS, constrain
    spec = importlib.util.spec_from_file_location("engine_layer_diff", {script!r})
    diff = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diff)
    for label, config in (("w8", QuantConfig(act_observer="minmax")),
                          ("w7", constrain(QuantConfig(act_observer="minmax"), TARGETS["x86_avx2"])[0])):
        prepared, x = calibrated(MODELS["resnet"], config, n=8)
        rows = diff.layer_differences(convert(prepared), x, "fbgemm")
        left = sorted(name for name, _, worst, _, _ in rows if worst > 1)
        flagged = sorted(name for name, _, _, _, overflow in rows if overflow)
        print(label, ",".join(left) or "-", ",".join(flagged) or "-")
""")


def test_layers_the_avx2_engine_leaves_are_the_flagged_ones() -> None:
    """scripts/engine_layer_diff.py with fbgemm's AVX2 kernels: every layer off by more than 1 LSB is one the
    diagnostic flags (it predicts from the integer model and the images alone), and with 7-bit weights none is."""
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    script = FLAGGED_VS_LEFT.format(tests=str(ROOT / "tests"), script=str(ROOT / "scripts" / "engine_layer_diff.py"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    found = {line.split()[0]: line.split()[1:] for line in result.stdout.strip().splitlines()}
    left, flagged = (set(v.split(",")) - {"-"} for v in found["w8"])
    assert left and left <= flagged, (left, flagged)
    assert found["w7"] == ["-", "-"]


def test_a_model_the_reference_cannot_run_gets_an_unsupported_saturation_block() -> None:
    """An int32 bias at the edge of its range (an LSQ run's first layer, whose learned weight step collapsed,
    measured 2147760507) overflows the accumulator: the diagnostic says so in the record, the run goes on."""
    from test_reference import MODELS, calibrated

    from qat.intmodel.convert import convert
    from qat.record_blocks import saturation_block

    prepared, x = calibrated(MODELS["tiny"], QuantConfig(act_observer="minmax"), n=4)
    int_model = convert(prepared)
    first = next(n for n in int_model.nodes if n.op == "conv2d")
    first.tensors["bias"] = torch.full_like(first.tensors["bias"], 2**31 - 1)
    block = saturation_block(int_model, [x], 4, ["onnxruntime"])
    assert block["status"] == "unsupported" and block["images"] == 0
    assert block["reason"].startswith(f"intmodel: layer {first.name}: the int32 accumulator overflows")
