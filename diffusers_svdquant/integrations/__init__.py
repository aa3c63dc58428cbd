"""The loaders' side: how ``from_pretrained`` of diffusers and transformers builds quantized models.

:mod:`.layers` (layer selection and swapping, ``quantize_`` / ``dequantize_``) is shared by
:mod:`.diffusers_quantizer` and :mod:`.transformers_quantizer`; :mod:`.registration` makes
``quant_method: "svdquant"`` resolve in both libraries.
"""
