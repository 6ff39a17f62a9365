"""Run directories unique even for runs started in the same second.

``configs/run.yaml`` names run and sweep directories ``<date>/<time>-<tag>-${qat_unique:}``. The resolver
draws a random token once per composed config (``use_cache=True``); Hydra copies the resolver cache from the
sweep's master config into every job config (``ConfigLoaderImpl.load_sweep_config``) and submitit pickles that
master config into each job, so a job and its requeued continuation resolve the same directory.
"""

from __future__ import annotations

import importlib.util
import secrets

RESOLVER = "qat_unique"


def unique_token() -> str:
    """8 random hex digits: two runs in the same second collide with probability 2**-32."""
    return secrets.token_hex(4)


def register_resolvers() -> None:
    """Register ``${qat_unique:}`` (idempotent). Without OmegaConf there are no Hydra configs to resolve and
    nothing to register: the library stays importable without Hydra."""
    if importlib.util.find_spec("omegaconf") is None:
        return
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, unique_token, use_cache=True)
