"""Registration of ``quant_method: "svdquant"`` with diffusers and transformers.

diffusers has no public registration call: ``diffusers.quantizers.auto`` resolves ``quant_method``
through two module-level dicts read at call time, so :func:`register` adds ``"svdquant"`` to both.
transformers has ``register_quantization_config`` / ``register_quantizer``. All four entries are
checked before any is written, so a collision with another package leaves both libraries as they were.
"""

from __future__ import annotations

import logging

from ..config import SVDQuantConfig, SVDQuantMethod
from .diffusers_quantizer import SVDQuantDiffusersQuantizer
from .transformers_quantizer import TRANSFORMERS_IMPORT_ERROR, SVDQuantHfQuantizer

logger = logging.getLogger(__name__)

KEY = SVDQuantMethod.SVDQUANT.value


def _entries() -> list[tuple[str, dict, type]]:
    """``(library, mapping, our class)`` for every registry entry ``"svdquant"`` needs."""
    from diffusers.quantizers import auto as diffusers_auto

    entries = [
        ("diffusers", diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, SVDQuantConfig),
        ("diffusers", diffusers_auto.AUTO_QUANTIZER_MAPPING, SVDQuantDiffusersQuantizer),
    ]
    if TRANSFORMERS_IMPORT_ERROR is None:
        from transformers.quantizers import auto as transformers_auto

        entries += [
            ("transformers", transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, SVDQuantConfig),
            ("transformers", transformers_auto.AUTO_QUANTIZER_MAPPING, SVDQuantHfQuantizer),
        ]
    else:
        logger.info("svdquant: transformers is not importable (%s); diffusers only", TRANSFORMERS_IMPORT_ERROR)
    return entries


def register() -> None:
    """Make ``quant_method: "svdquant"`` resolve in diffusers (and transformers, when importable).

    Idempotent. Raises ``RuntimeError`` if another package already holds the key with a different
    class in any of the registries, before writing any of them: overwriting silently would load
    the wrong model, and a half-done registration would load it with the wrong code in one library.
    """
    entries = _entries()
    for library, mapping, cls in entries:
        held = mapping.get(KEY)
        if held is not None and held is not cls:
            raise RuntimeError(
                f"{library} already maps quant_method {KEY!r} to {held.__module__}.{held.__qualname__}; "
                f"refusing to replace it with {cls.__module__}.{cls.__qualname__}"
            )
    for library, mapping, cls in entries:
        if library == "transformers" and KEY not in mapping:
            from transformers.quantizers import register_quantization_config, register_quantizer

            register_fn = register_quantization_config if cls is SVDQuantConfig else register_quantizer
            register_fn(KEY)(cls)
        else:
            mapping[KEY] = cls
