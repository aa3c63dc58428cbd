"""Install the PEFT integration (:mod:`.peft`) when peft's LoRA package is first imported, not before.

Importing peft costs about 0.5 s (it imports transformers' model code), and most programs that quantize never load
a LoRA. Every LoRA entry point imports ``peft.tuners.lora`` before it builds a layer (diffusers'
``load_lora_adapter`` imports peft lazily too), so the integration is installed right after that package's own
code has run: a one-shot finder on ``sys.meta_path`` wraps the package's loader. If peft is already imported, the
integration is installed at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

PEFT_LORA_PACKAGE = "peft.tuners.lora"
# Why installing the integration failed (peft or the transformers it imports unusable), or None.
install_error: Exception | None = None


def install_now() -> None:
    """Import :mod:`.peft` and route PEFT's layer creation for quantized layers through it; a failure is kept in
    :data:`install_error` (quantization works without it; LoRA on quantized layers does not)."""
    global install_error
    try:
        from .peft import register_peft

        register_peft()
        install_error = None
    except Exception as e:  # peft unusable here: quantization still works, LoRA does not
        install_error = e


class _AfterLoraImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for :data:`PEFT_LORA_PACKAGE` it hands back the real spec with a loader that runs
    :func:`install_now` after the package's code, then leaves ``sys.meta_path``."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != PEFT_LORA_PACKAGE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_package = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run_package(module)
            install_now()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install_when_imported() -> None:
    """Install the integration once ``peft.tuners.lora`` is imported (at once if it already is). Idempotent."""
    if PEFT_LORA_PACKAGE in sys.modules:
        install_now()
    elif not any(isinstance(f, _AfterLoraImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterLoraImport())
