"""Deployment targets: the machine an integer model will run on, its engines, and the grid their kernels need.

A target is data: which engines deploy the model, how their int8 GEMMs accumulate, and which weight or
activation grid keeps them exact. The quantization recipe obeys it before any training (:func:`constrain`), so
the integer model the run converts is one the target's kernels compute exactly (Jacob eq. 7), and the record
says which target, which constraint, and which host flags.

x86 int8 kernels without VNNI (fbgemm, ONNX Runtime's MLAS u8s8) add each pair of uint8 × int8 products in
saturating int16 (``vpmaddubsw``; :mod:`qat.intmodel.saturation`): 2 · 255 · 127 = 64770 > 32767. Two grids
prevent it: 7-bit weights (|q_w| ≤ 64: OpenVINO's remedy on such CPUs) or 7-bit activations in [0, 127]
(torch.ao's ``reduce_range``). ``target.avx2_grid`` chooses; the default is the one that cost less accuracy on
the demo (README, "Deployment targets").

``target=auto`` reads the host's CPU flags: AVX-512 VNNI → ``x86_vnni``; other x86 (AVX2, also hosts with
AVX-VNNI only, whose 256-bit VNNI fbgemm does not use) → ``x86_avx2``; ARM → ``arm``; anything else →
``generic``. Deploying elsewhere than the training host is the point of naming a target explicitly.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Any

from qat.errors import QatError, choice_error

KEY = "target.name"
GRID_KEY = "target.avx2_grid"
AVX2_GRIDS = ("weights7", "acts7")


@dataclass(frozen=True)
class Target:
    """One deployment target (constraints as data; engines by their registry names)."""

    name: str
    description: str
    engines: tuple[str, ...]  # int8 engines that deploy to it; the first is the run's primary (latency) engine
    accumulation: str  # "int32" (exact, Jacob eq. 7) | "pair16" (u8·s8 pairs in saturating int16, then int32)
    latency_backend: str = "x86"  # torch_native's quantized backend when the primary engine is torch_native

    @property
    def max_bits(self) -> int:
        """The widest grid every engine of the target holds (the engine registry's ``max_bits``)."""
        from qat.engines import registry

        return min((registry.entry(e).max_bits for e in self.engines), default=16)

    @property
    def symmetric_weights(self) -> bool:
        """Whether an engine of the target needs zero-point-0 weights (e.g. XNNPACK's qc8w; the registry's)."""
        from qat.engines import registry

        return any(registry.entry(e).symmetric_weights for e in self.engines)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("x86_vnni", "x86 with AVX-512 VNNI (Intel Cascade Lake and later servers, AMD Zen 4 and later): "
           "int8 pairs accumulate in int32 (vpdpbusd), exact", ("torch_native_x86", "onnxruntime"), "int32"),
    Target("x86_avx2", "x86 with AVX2 and no AVX-512 VNNI (older Xeons, AMD Zen 1-3, most laptops): fbgemm and "
           "ONNX Runtime add u8·s8 pairs in saturating int16 (vpmaddubsw)", ("torch_native_x86", "onnxruntime"),
           "pair16"),
    Target("arm", "ARM phones and boards (XNNPACK through ExecuTorch, qnnpack): products widened before "
           "accumulation, exact; XNNPACK needs symmetric weights", ("executorch_xnnpack", "torch_native_qnnpack"),
           "int32", latency_backend="qnnpack"),
    Target("generic", "no hardware constraint: the integer-only reference executor's arithmetic (Jacob eq. 7); "
           "latency on ONNX Runtime", ("onnxruntime",), "int32"),
)}
TARGET_NAMES = ("auto", *TARGETS)
X86 = ("x86_64", "amd64", "i686", "x86")
PAIR_ISAS = ("AVX2", "AVX512")  # values of fbgemm's FBGEMM_ENABLE_INSTRUCTIONS whose kernels have no VNNI


@functools.cache
def host_machine() -> tuple[list[str], str]:
    """The host's CPU flags of interest (``qat.latency.host``) and its machine name (x86_64, aarch64, ...);
    read once per process (every ``latency.engine=auto`` lookup asks)."""
    from qat.latency.host import describe_host

    host = describe_host()
    return list(host["cpu_flags"]), str(host["machine"])  # type: ignore[arg-type]


def auto_target(flags: Collection[str], machine: str) -> tuple[str, str]:
    """(target name, why) for a host with CPU ``flags`` and ``machine``."""
    machine = machine.lower()
    if machine in X86:
        if "avx512_vnni" in flags:
            return "x86_vnni", "the host has avx512_vnni"
        have = "avx_vnni only (fbgemm does not use it)" if "avx_vnni" in flags else "no avx512_vnni"
        return "x86_avx2", f"the host is x86 with {have}"
    if machine in ("aarch64", "arm64") or machine.startswith("arm"):
        return "arm", f"the host is {machine}"
    return "generic", f"no x86 or ARM target matches machine {machine!r}"


def resolve(name: str, flags: Collection[str] | None = None, machine: str | None = None) -> tuple[Target, str]:
    """The target ``name`` (``auto``: from ``flags``/``machine``, by default the host's) and why it was chosen."""
    if name not in TARGET_NAMES:
        raise choice_error(KEY, name, TARGET_NAMES)
    if name != "auto":
        return TARGETS[name], "given as target.name"
    if flags is None or machine is None:
        host_flags, host_name = host_machine()
        flags = host_flags if flags is None else flags
        machine = host_name if machine is None else machine
    chosen, why = auto_target(flags, machine)
    restricted = [e for e in TARGETS[chosen].engines if isa_restricted(e)]
    if TARGETS[chosen].accumulation == "int32" and restricted and machine.lower() in X86:
        env = _isa_env(restricted[0])
        chosen, why = "x86_avx2", f"{env}={os.environ[env]} restricts {restricted[0]} to kernels without VNNI"
    return TARGETS[chosen], f"auto: {why}"


@dataclass
class Constraint:
    """One change the target made to the recipe: the key, the configured and applied values, and why."""

    key: str
    config: Any
    applied: Any
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "config": self.config, "applied": self.applied, "why": self.why}


@dataclass
class Plan:
    """What a target does to one run: the target, the recipe changes, and the host it was resolved on."""

    target: Target
    why: str
    avx2_grid: str
    constraints: list[Constraint] = field(default_factory=list)
    host_flags: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"name": self.target.name, "chosen": self.why, "description": self.target.description,
                "accumulation": self.target.accumulation, "engines": list(self.target.engines),
                **({"avx2_grid": self.avx2_grid} if self.target.accumulation == "pair16" else {}),
                "constraints": [c.as_dict() for c in self.constraints], "host_flags": self.host_flags,
                "isa_overrides": isa_overrides(), "warnings": self.warnings}


def _check_bits(quant: Any, target: Target) -> None:
    for key in ("weight_bits", "act_bits"):
        bits = getattr(quant, key)
        if bits > target.max_bits:
            raise QatError(f"quant.{key}", f"{bits}-bit grids cannot run on target {target.name}'s int8 engines "
                           f"({', '.join(target.engines)})", f"set quant.{key} to {target.max_bits} or fewer")
    if quant.input_bits is not None and quant.input_bits > target.max_bits:
        raise QatError("quant.input_bits", f"{quant.input_bits}-bit grids cannot run on target {target.name}'s int8 "
                       "engines", f"set quant.input_bits to {target.max_bits} or fewer")
    for o in quant.overrides:
        for key in ("weight_bits", "act_bits"):
            bits = getattr(o, key)
            if bits is not None and bits > target.max_bits:
                raise QatError(f"quant.overrides[{o.pattern}].{key}", f"{bits}-bit grids cannot run on target "
                               f"{target.name}'s int8 engines", f"use {target.max_bits} bits or fewer")


def constrain(quant: Any, target: Target, avx2_grid: str = "weights7") -> tuple[Any, list[Constraint]]:
    """``quant`` (a :class:`qat.quant.config.QuantConfig` or the run's quant group) made exact on ``target``.

    pair16 targets: ``weights7`` caps every weight grid at 7 bits (|q_w| ≤ 64, so 2·255·64 = 32640 fits int16);
    ``acts7`` caps every activation grid at 7 unsigned bits (2·127·128 = 32512). XNNPACK targets need symmetric
    weights: an asymmetric recipe is refused, not changed. Float recipes are returned as they are."""
    if avx2_grid not in AVX2_GRIDS:
        raise choice_error(GRID_KEY, avx2_grid, AVX2_GRIDS)
    if getattr(quant, "precision", "int8") == "float":
        return quant, []
    _check_bits(quant, target)
    if target.symmetric_weights and not quant.weight_symmetric:
        raise QatError("quant.weight_symmetric", f"target {target.name}'s engines ({', '.join(target.engines)}) "
                       "need symmetric weights (zero point 0)", "set quant.weight_symmetric=true or choose another "
                       "target")
    if target.accumulation != "pair16":
        return quant, []
    why = (f"target {target.name}: u8·s8 pairs are summed in saturating int16; "
           + ("7-bit weights keep 2·255·64 = 32640 ≤ 32767" if avx2_grid == "weights7"
              else "7-bit activations keep 2·127·128 = 32512 ≤ 32767"))
    key = "weight_bits" if avx2_grid == "weights7" else "act_bits"
    if avx2_grid == "acts7" and quant.act_symmetric:
        raise QatError("quant.act_symmetric", f"target {target.name} with {GRID_KEY}=acts7 needs unsigned "
                       "activations (a signed 7-bit grid reaches uint8 code 191 in the kernels)",
                       f"set quant.act_symmetric=false or {GRID_KEY}=weights7")
    constraints: list[Constraint] = []
    changes: dict[str, Any] = {}
    if getattr(quant, key) > 7:
        constraints.append(Constraint(f"quant.{key}", getattr(quant, key), 7, why))
        changes[key] = 7
    if key == "act_bits" and quant.input_bits is not None and quant.input_bits > 7:
        constraints.append(Constraint("quant.input_bits", quant.input_bits, 7, why))
        changes["input_bits"] = 7
    overrides = []
    for o in quant.overrides:
        value = getattr(o, key)
        if value is not None and value > 7:
            constraints.append(Constraint(f"quant.overrides[{o.pattern}].{key}", value, 7, why))
            o = replace(o, **{key: 7})
        overrides.append(o)
    return replace(quant, **changes, overrides=overrides), constraints


def plan(name: str, quant: Any, avx2_grid: str = "weights7", flags: Collection[str] | None = None,
         machine: str | None = None) -> tuple[Plan, Any]:
    """Resolve the target and constrain ``quant``; returns the plan (for the record) and the recipe that runs."""
    target, why = resolve(name, flags, machine)
    host_flags = list(flags if flags is not None else host_machine()[0])
    constrained, constraints = constrain(quant, target, avx2_grid)
    return Plan(target, why, avx2_grid, constraints, host_flags), constrained


def _isa_env(engine: str) -> str:
    from qat.engines import registry

    return registry.entry(engine).isa_env or ""


def isa_restricted(engine: str) -> bool:
    """Whether an environment variable restricts ``engine``'s kernels to an ISA without VNNI in this process
    (``FBGEMM_ENABLE_INSTRUCTIONS=AVX2``: fbgemm's AVX2 kernels on a VNNI host, i.e. an AVX2 deployment)."""
    env = _isa_env(engine)
    return bool(env) and os.environ.get(env, "").upper() in PAIR_ISAS


def isa_overrides() -> dict[str, str]:
    """The engines' ISA-restricting environment variables set in this process (e.g. fbgemm's), for the record."""
    from qat.engines import registry

    names = {e.isa_env for e in registry.ENGINES.values() if e.isa_env}
    return {name: os.environ[name] for name in sorted(names) if name in os.environ}


def accumulates_in_pairs(engine: str, flags: Collection[str] | None = None, machine: str | None = None) -> bool:
    """Whether ``engine``'s u8·s8 GEMMs add product pairs in saturating int16 on this host (by default the
    running one): an x86 host without the flags its exact kernels need (the registry's ``exact_int8_flags``),
    or kernels restricted by :func:`isa_restricted`."""
    from qat.engines import registry

    exact_flags = registry.entry(engine).exact_int8_flags
    if exact_flags is None:
        return False
    machine = (machine or host_machine()[1]).lower()
    if machine not in X86:
        return False
    flags = host_machine()[0] if flags is None else flags
    return isa_restricted(engine) or not any(f in flags for f in exact_flags)


def can_saturate(quant: Any) -> bool:
    """Whether a recipe's grids allow 16-bit pair sums beyond int16: weights and activations both wider than
    7 bits somewhere (7-bit weights or 7-bit unsigned activations everywhere rule it out; :func:`constrain`)."""
    if getattr(quant, "precision", "int8") == "float":
        return False
    weights = [quant.weight_bits, *(o.weight_bits for o in quant.overrides if o.weight_bits is not None)]
    acts = [quant.act_bits, *(o.act_bits for o in quant.overrides if o.act_bits is not None),
            *([quant.input_bits] if quant.input_bits is not None else [])]
    acts_unsigned_7 = max(acts) <= 7 and not quant.act_symmetric
    return max(weights) > 7 and not acts_unsigned_7


def check_installed(target: Target, engines: Collection[str] = ()) -> None:
    """One line naming ``target.name`` when an engine of the target (or of ``engines``) is not installed."""
    from qat.engines import registry

    for engine in dict.fromkeys([*target.engines, *engines]):
        if engine in registry.ENGINES and not registry.is_installed(engine):
            package = registry.entry(engine).package
            raise QatError(KEY, f"target {target.name}'s engine {engine} needs the Python package {package!r}, "
                           "which is not installed", f"pip install {package}, or choose another target "
                           f"({', '.join(TARGET_NAMES)})")


def saturation_warnings(deployment: Plan, quant: Any, engines: Collection[str]) -> list[str]:
    """One line per engine of ``engines`` that sums int16 pairs on this host while ``quant`` can overflow them."""
    from qat.engines import registry

    lines = []
    for engine in dict.fromkeys(engines):
        if engine in registry.ENGINES and can_saturate(quant) and accumulates_in_pairs(engine):
            why = (f"{_isa_env(engine)}={os.environ[_isa_env(engine)]}" if isa_restricted(engine)
                   else f"this host has none of {', '.join(registry.entry(engine).exact_int8_flags or ())}")
            lines.append(f"{engine} adds u8·s8 pairs in saturating int16 here ({why}) and target "
                         f"{deployment.target.name}'s recipe can overflow them: its int8 outputs may leave the "
                         "simulated model's (the record's saturation block says where; target.name=x86_avx2 or "
                         "auto prevents it)")
    return lines
