"""Exports for devices this machine cannot reach: the engine file (.onnx, .pte) plus a manifest (issue 5)."""

from qat.export.bundle import export_model, verify_export
from qat.export.manifest import MANIFEST_NAME, MANIFEST_SCHEMA

__all__ = ["MANIFEST_NAME", "MANIFEST_SCHEMA", "export_model", "verify_export"]
