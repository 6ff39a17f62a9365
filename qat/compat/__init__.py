"""Where qat touches private APIs of its libraries: one adapter module per library.

A private API (a name with a leading underscore, ``onnxruntime.capi``, ExecuTorch's serialization internals)
can change in any release. Each library's private uses sit in one adapter module, which states the version
they were checked against in ``CHECKED_AGAINST``; ``constraints.txt`` pins exactly those versions and
``tests/test_private_apis.py`` scans ``qat/``, ``experiments/`` and ``scripts/`` to keep it so. Upgrading one of
these libraries means re-checking its adapter and bumping its ``CHECKED_AGAINST``.
"""

from __future__ import annotations

ADAPTERS: dict[str, str] = {
    "torch": "qat.compat.torch_private",
    "torchvision": "qat.compat.torch_private",
    "onnxruntime": "qat.engines.onnxruntime_qdq",
    "executorch": "qat.engines.executorch_xnnpack",
}
