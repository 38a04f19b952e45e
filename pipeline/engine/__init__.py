"""Quantization engines: one package per concern of torch.ao's FX flow (qconfigs, observers, mappings,
custom modules, numerics, introspection, the FX calls), behind the `Engine` Protocol of base.py so a
second engine (torchao's pt2e, engine/pt2e.py) sits beside it without touching the stages.

Imports only the bottom layer (pipeline.errors, pipeline.schema). `get_engine(name)` is how stages,
the cache and validation reach an engine.
"""

from __future__ import annotations

import warnings

# torch 2.13 deprecates torch.ao.quantization as a whole; this project is built on it knowingly.
# Filter exactly that warning, here before any module of this package imports it, and nothing broader.
warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)

from pipeline.engine.base import Engine, ReferenceConversion, UntraceableModule  # noqa: E402
from pipeline.engine.fx import FxEngine  # noqa: E402
from pipeline.engine.pt2e import Pt2eEngine  # noqa: E402  (imports torchao only when used)
from pipeline.errors import ConfigError, closest  # noqa: E402
from pipeline.schema import EngineSpec  # noqa: E402

ENGINES: dict[str, Engine] = {"fx": FxEngine(), "pt2e": Pt2eEngine()}

__all__ = ["ENGINES", "Engine", "ReferenceConversion", "UntraceableModule", "get_engine"]


def get_engine(spec: EngineSpec | str = "fx") -> Engine:
    """The engine the config's `engine` group names (a spec carries its settings; a bare name, its defaults)."""
    name = spec if isinstance(spec, str) else spec.name
    if name not in ENGINES:
        raise ConfigError(
            f"engine.name='{name}' is not known; choose one of {list(ENGINES)}.{closest(name, list(ENGINES))}"
        )
    if name == "pt2e" and not isinstance(spec, str):
        return Pt2eEngine(spec)
    return ENGINES[name]
