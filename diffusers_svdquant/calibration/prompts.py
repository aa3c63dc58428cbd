"""Calibration prompts shipped with the package.

Activation outliers in diffusion transformers depend on content, so the set spans subjects
(people, animals, objects, scenes, text in images), styles (photo, painting, 3-D render, line art,
anime), lighting, compositions and prompt lengths, from a few words to a dense paragraph. Users pass
their own with ``calibrate(pipe, prompts=[...])`` or ``svdquant calibrate --prompts FILE``.
"""

from __future__ import annotations

CALIBRATION_PROMPTS: tuple[str, ...] = (
    "a photo of a cat",
    "a red bicycle leaning against a brick wall",
    "portrait of an elderly fisherman with a weathered face, natural window light, 85mm lens",
    "a bowl of ramen with a soft-boiled egg, steam rising, overhead shot",
    "a snowy mountain range at sunrise, alpenglow on the peaks, crisp air",
    "an astronaut riding a horse on the moon, photorealistic",
    "a watercolor painting of a lighthouse on a cliff during a storm",
    "isometric 3d render of a tiny cozy bedroom with plants and warm lamps",
    "a neon sign that says 'OPEN 24 HOURS' above a rainy city street at night",
    "close-up macro photograph of a dewdrop on a spider web",
    "a golden retriever puppy playing in autumn leaves",
    "an oil painting of a busy harbor in the 18th century, ships with tall masts",
    "minimalist line art of a woman's profile, single continuous line",
    "anime style girl with short blue hair standing in a field of sunflowers",
    "a futuristic city skyline with flying cars, cyberpunk, volumetric fog",
    "a plate of colorful macarons on a marble table, soft pastel tones",
    "black and white street photography, a man with an umbrella crossing the road",
    "a medieval knight in ornate armor, dramatic rim lighting, dark background",
    "children flying kites on a beach, wide angle, bright summer day",
    "a steaming cup of coffee next to an open book by a rainy window",
    "aerial view of a winding river through a dense green rainforest",
    "a pixel art castle on a floating island, 16-bit video game style",
    "an owl perched on a branch under a full moon, highly detailed feathers",
    "a vintage poster advertising a jazz festival, bold typography, art deco",
    "a bustling night market in Taipei with food stalls and lanterns",
    "a chrome robot playing chess against a child in a library",
    "a field of lavender in Provence with a stone farmhouse, golden hour",
    "studio product photo of a white sneaker on a pastel blue background",
    "a dragon made of smoke curling around an ancient temple",
    "an underwater coral reef with schools of tropical fish, sun rays",
    "a hand-drawn map of a fantasy kingdom with mountains, forests and rivers",
    "a sleepy fox curled up in the snow",
    "interior of a gothic cathedral, stained glass light beams, wide shot",
    "a bowl of fruit in the style of Cezanne",
    "a scientist looking through a microscope in a modern laboratory, cinematic",
    "a tiny mouse wearing a knitted scarf reading a book under a mushroom",
    "desert dunes with a lone camel caravan, long shadows at dusk",
    "a hyperrealistic portrait of a young woman with freckles and green eyes",
    "a chalkboard with handwritten math equations and a diagram of a triangle",
    "a sports car drifting on a mountain road, motion blur, dusk",
    "a cozy cabin in a pine forest, smoke from the chimney, winter evening",
    "a bouquet of wildflowers in a glass jar, soft natural light",
    "comic book panel of a superhero landing on a rooftop, halftone shading",
    "a traditional Japanese garden with a koi pond and a red bridge in autumn",
    "a close-up of an old man's hands shaping clay on a pottery wheel",
    "low poly illustration of a mountain lake with a canoe",
    "a crowded subway car during rush hour, documentary photography",
    "an elephant family walking across the savanna under a stormy sky",
    "a surreal landscape with melting clocks and floating stairs",
    "a birthday cake with lit candles, confetti, shallow depth of field",
    "a blueprint drawing of a steam locomotive, technical illustration",
    "a baroque still life with a skull, candles and a silver goblet",
    "a herd of wild horses galloping through a shallow river, splashes frozen in time",
    "the text 'HELLO WORLD' written in colorful balloons against a blue sky",
    "a glass terrarium with moss, ferns and a tiny porcelain deer",
    "a rainy Tokyo alley with reflections on wet pavement, film photography, 35mm",
    "an abstract composition of overlapping translucent geometric shapes in primary colors",
    "a knitted wool sweater folded on a wooden chair, product shot",
    "two friends laughing at a cafe table outdoors in Paris, candid",
    "a volcano erupting at night with lightning in the ash cloud",
    "an embroidery pattern of a hummingbird and hibiscus flowers",
    "a farmer harvesting rice in terraced paddies, misty morning, wide landscape",
    (
        "A highly detailed fantasy illustration of an ancient library built inside a hollow tree, "
        "spiral staircases winding up the trunk, glowing lanterns hanging from branches, an old "
        "wizard with a long grey beard reading a floating book, dust motes in shafts of warm light"
    ),
    (
        "Professional food photography of a rustic sourdough loaf sliced on a wooden board, butter, "
        "sea salt flakes, a linen cloth, dark moody background, side lighting, shallow depth of field"
    ),
)

# Held out from calibration: what the quality report generates and compares.
EVAL_PROMPTS: tuple[str, ...] = (
    "a lighthouse keeper's cottage on a rocky island at sunset",
    "a bowl of cherries on a checkered tablecloth, soft morning light",
    "a cyclist racing down a mountain pass, motion blur",
    "an ink drawing of a heron standing in reeds",
    "a child's drawing of a house with a smiling sun",
    "a close-up portrait of a tabby cat with amber eyes",
    "a busy train station concourse seen from above",
    "a glass of iced tea with lemon on a wooden porch",
)
