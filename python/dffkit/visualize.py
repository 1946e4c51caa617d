"""Pictures of concept maps: colour maps, concept overlays with a legend, image grids.

Pillow and numpy only. Arrays are (H, W) or (k, H, W) float in [0, 1] for heat, (H, W, 3)
uint8 for pictures; functions that return pictures return ``PIL.Image.Image`` in mode RGB.
"""
from __future__ import annotations

import colorsys
import functools
import threading
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "COLORMAPS",
    "concept_colors",
    "apply_colormap",
    "desaturate",
    "blend_concepts",
    "overlay",
    "add_legend",
    "heatmap_image",
    "heatmap_over",
    "label_image",
    "grid",
]

# anchor colours, evenly spaced in [0, 1], interpolated linearly (matplotlib's maps sampled)
COLORMAPS = {
    "viridis": [(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
                (31, 158, 137), (53, 183, 121), (110, 206, 88), (181, 222, 43), (253, 231, 37)],
    "magma": [(0, 0, 4), (28, 16, 68), (79, 18, 123), (129, 37, 129), (181, 54, 122),
              (229, 80, 100), (251, 135, 97), (254, 194, 135), (252, 253, 191)],
    "gray": [(0, 0, 0), (255, 255, 255)],
}

# a qualitative palette (Tableau 10) for up to 10 concepts; more get evenly spaced hues
_TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _pil():
    from PIL import Image

    return Image


def _check_opacity(opacity) -> float:
    """``opacity`` as a float in [0, 1] (0: the photo alone, 1: the colours alone); TypeError
    for anything but a real number, ValueError outside [0, 1] (NaN included)."""
    if isinstance(opacity, (bool, np.bool_)) or not isinstance(opacity, (int, float, np.integer, np.floating)):
        raise TypeError(f"opacity must be a number in [0, 1] (0: the photo alone, 1: the colours alone), "
                        f"got {opacity!r} of type {type(opacity).__name__}")
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"opacity must be in [0, 1] (0: the photo alone, 1: the colours alone), got {opacity!r}; "
                         "pass a value in that range, e.g. opacity=0.75")
    return float(opacity)


def _check_positive_int(name: str, value, example: int) -> int:
    """``value`` as a positive int (numpy ints too, bools not); TypeError / ValueError naming
    ``name`` otherwise, with ``example`` as the fix."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, e.g. {name}={example}; got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int (at least 1), e.g. {name}={example}; got {value}")
    return int(value)


def concept_colors(k: int) -> np.ndarray:
    """(k, 3) uint8: one distinct colour per concept (Tableau 10, then evenly spaced hues)."""
    if k <= len(_TAB10):
        return np.array(_TAB10[:k], dtype=np.uint8).reshape(k, 3)
    hues = np.arange(k) / k
    rgb = [colorsys.hsv_to_rgb(h, 0.85, 0.95) for h in hues]
    return np.round(np.array(rgb) * 255).astype(np.uint8)


#: entries of the colour maps' lookup tables: values are placed to 1/4095 (a colour differs
#: from the exact interpolation by at most one level of 255)
LUT_SIZE = 4096


@functools.lru_cache(maxsize=None)
def _colormap_lut(name: str) -> np.ndarray:
    """(LUT_SIZE, 3) uint8: the map's anchors interpolated linearly at i / (LUT_SIZE - 1)."""
    anchors = np.asarray(COLORMAPS[name], dtype=np.float64)
    x = np.linspace(0.0, 1.0, LUT_SIZE) * (len(anchors) - 1)
    i0 = np.minimum(x.astype(np.int64), len(anchors) - 2)
    t = (x - i0)[:, None]
    lut = np.round(anchors[i0] * (1.0 - t) + anchors[i0 + 1] * t).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def apply_colormap(values, name: str = "viridis") -> np.ndarray:
    """(H, W) values in [0, 1] (clipped; NaN as 0) -> (H, W, 3) uint8 through a colour map
    (a lookup table of ``LUT_SIZE`` entries)."""
    if name not in COLORMAPS:
        raise ValueError(f"colour map must be one of {sorted(COLORMAPS)}, got {name!r}")
    x = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    index = np.clip(x, 0.0, 1.0)
    index *= LUT_SIZE - 1
    index += 0.5
    return _colormap_lut(name)[index.astype(np.intp)]


def _as_rgb_array(image) -> np.ndarray:
    Image = _pil()
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected a PIL image or an (H, W, 3) uint8 array, got {a.dtype} {a.shape}")
    return a


def desaturate(image, saturation: float = 0.2, brightness: float = 0.85) -> np.ndarray:
    """(H, W, 3) uint8: the photo with its colour mostly removed and slightly darkened, so
    that concept colours laid over it stand out."""
    a = _as_rgb_array(image).astype(np.float32)
    gray = a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    out = (gray[..., None] * (1.0 - saturation) + a * saturation) * brightness
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def blend_concepts(heat, colors=None):
    """Mix concept colours by heat.

    Parameters
    ----------
    heat : (k, H, W) float in [0, 1]
    colors : (k, 3) uint8, optional (``concept_colors(k)``)

    Returns
    -------
    rgb : (H, W, 3) float32, the heat-weighted mean colour at each pixel
    strength : (H, W) float32, the strongest heat at each pixel
    """
    heat = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    if heat.ndim != 3:
        raise ValueError(f"heat must be (k, H, W), got shape {heat.shape}")
    k = heat.shape[0]
    colors = concept_colors(k) if colors is None else np.asarray(colors, dtype=np.uint8)
    # sharpen the weights so that the strongest concept dominates where several overlap
    weights = heat ** 4
    total = weights.sum(axis=0)
    rgb = np.tensordot(weights, colors.astype(np.float32), axes=([0], [0]))
    rgb /= np.maximum(total, 1e-12)[..., None]
    return rgb, heat.max(axis=0)


def overlay(image, heat, colors=None, *, opacity: float = 0.75, names: Optional[Sequence[str]] = None,
            title: Optional[str] = None):
    """A desaturated photo with each concept painted in its colour, opacity by heat.

    ``image``: PIL image or (H, W, 3) uint8; ``heat``: (k, H, W) in [0, 1] at the image's
    size; ``opacity``: a number in [0, 1] (TypeError / ValueError otherwise). With ``names`` a
    legend (colour swatch and name per concept) is added below (``add_legend``). Returns a
    PIL RGB image.
    """
    Image = _pil()
    opacity = _check_opacity(opacity)
    base = desaturate(image).astype(np.float32)
    if np.shape(heat)[1:] != base.shape[:2]:
        raise ValueError(f"heat maps {np.shape(heat)[1:]} and image {base.shape[:2]} differ in size")
    k = np.shape(heat)[0]
    colors = concept_colors(k) if colors is None else np.asarray(colors, dtype=np.uint8)
    rgb, strength = blend_concepts(heat, colors)
    alpha = (opacity * strength)[..., None]
    out = Image.fromarray(np.clip(np.round(base * (1.0 - alpha) + rgb * alpha), 0, 255).astype(np.uint8), "RGB")
    if names is not None:
        out = add_legend(out, names, colors, title=title)
    return out


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font only
        return ImageFont.load_default()


def _text_size(draw, text, font):
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def _fit(draw, text: str, font, width: int) -> str:
    """``text``, cut short with "..." so that it fits ``width`` pixels."""
    if _text_size(draw, text, font)[0] <= width:
        return text
    while text and _text_size(draw, text + "...", font)[0] > width:
        text = text[:-1]
    return text + "..." if text else ""


#: the widest a legend makes its picture for a narrow image (pixels): the widest entry up to this
LEGEND_MIN_WIDTH = 240

#: text is drawn under this lock: Pillow's FreeType fonts share one library, and pictures
#: are drawn on several threads (``DFFResult.save``)
_TEXT_LOCK = threading.Lock()


def add_legend(image, names: Sequence[str], colors=None, *, title: Optional[str] = None):
    """``image`` with a legend panel below it: a colour swatch and a name per concept
    (wrapped into as many columns as fit), and an optional title line. An image narrower
    than the widest entry (at most ``LEGEND_MIN_WIDTH`` pixels) is placed at the top left of
    a white canvas that wide, so that the legend stays readable."""
    with _TEXT_LOCK:
        return _add_legend(image, names, colors, title)


def _add_legend(image, names, colors, title):
    Image = _pil()
    from PIL import ImageDraw

    img = image if isinstance(image, Image.Image) else Image.fromarray(_as_rgb_array(image))
    colors = concept_colors(len(names)) if colors is None else np.asarray(colors, dtype=np.uint8)
    font = _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = max(14, _text_size(probe, "Ag", font)[1] + 6)
    swatch = line - 4
    entries = [str(n) for n in names]
    widths = [swatch + 6 + _text_size(probe, e, font)[0] + 14 for e in entries]
    width = max(img.width, min(max(widths, default=0) + 6, LEGEND_MIN_WIDTH))
    per_row = max(1, min(len(entries), width // max(max(widths, default=1), 1)))
    col_w = max(width // per_row, 1)
    rows = -(-len(entries) // per_row)
    title_h = line if title else 0
    panel_h = 6 + title_h + rows * line + 4
    out = Image.new("RGB", (width, img.height + panel_h), (255, 255, 255))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    y0 = img.height + 6
    if title:
        draw.text((6, y0), _fit(draw, title, font, width - 12), fill=(40, 40, 40), font=font)
        y0 += title_h
    for j, entry in enumerate(entries):
        r, c = divmod(j, per_row)
        x, y = 6 + c * col_w, y0 + r * line
        draw.rectangle([x, y, x + swatch, y + swatch], fill=tuple(int(v) for v in colors[j]), outline=(0, 0, 0))
        text = _fit(draw, entry, font, col_w - swatch - 14)
        draw.text((x + swatch + 6, y), text, fill=(0, 0, 0), font=font)
    return out


def heatmap_image(heat, image=None, *, colormap: str = "viridis", opacity: float = 0.6):
    """One heat map (H, W) in [0, 1] as a PIL image through ``colormap``; laid over a
    desaturated ``image`` (same size) with the given opacity when one is passed."""
    return heatmap_over(heat, None if image is None else desaturate(image), colormap=colormap, opacity=opacity)


def heatmap_over(heat, base: Optional[np.ndarray], *, colormap: str = "viridis", opacity: float = 0.6):
    """``heatmap_image`` over an already desaturated photo ``base`` ((H, W, 3) uint8, from
    ``desaturate``; None: the colour map alone): for several maps of one photo."""
    Image = _pil()
    opacity = _check_opacity(opacity)
    rgb = apply_colormap(heat, colormap)
    if base is not None:
        if base.shape[:2] != rgb.shape[:2]:
            raise ValueError(f"heat map {rgb.shape[:2]} and image {base.shape[:2]} differ in size")
        mixed = base.astype(np.float32)
        mixed *= 1.0 - opacity
        mixed += rgb.astype(np.float32) * opacity
        rgb = np.round(mixed, out=mixed).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def label_image(labels, colors=None, background=(0, 0, 0)):
    """An (H, W) integer label map (-1 = background) as a PIL image, a colour per label."""
    Image = _pil()
    labels = np.asarray(labels)
    k = int(labels.max()) + 1 if labels.size else 0
    colors = concept_colors(max(k, 1)) if colors is None else np.asarray(colors, dtype=np.uint8)
    table = np.vstack([colors, np.asarray(background, dtype=np.uint8)[None]])
    return Image.fromarray(table[np.where(labels < 0, len(colors), labels)], "RGB")


def grid(images: Sequence, captions: Optional[Sequence[str]] = None, *, columns: Optional[int] = None,
         cell: int = 256, background=(255, 255, 255)):
    """Tile PIL images into one picture, each scaled to fit a ``cell`` x ``cell`` box (aspect
    kept), with an optional caption under each. ``cell`` (pixels) and ``columns`` (None: about
    the square root of the number of images) are positive ints (TypeError / ValueError
    otherwise)."""
    Image = _pil()
    from PIL import ImageDraw

    cell = _check_positive_int("cell", cell, 256)
    if columns is not None:
        columns = _check_positive_int("columns", columns, 4)
    if not images:
        raise ValueError("grid needs at least one image")
    n = len(images)
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = -(-n // columns)
    with _TEXT_LOCK:
        font = _font(12)
    caption_h = 18 if captions else 0
    pad = 4
    out = Image.new("RGB", (columns * (cell + pad) + pad, rows * (cell + caption_h + pad) + pad), background)
    draw = ImageDraw.Draw(out)
    for idx, im in enumerate(images):
        r, c = divmod(idx, columns)
        scale = min(cell / im.width, cell / im.height)
        thumb = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
        x = pad + c * (cell + pad) + (cell - thumb.width) // 2
        y = pad + r * (cell + caption_h + pad)
        out.paste(thumb, (x, y + (cell - thumb.height) // 2))
        if captions:
            with _TEXT_LOCK:
                text = _fit(draw, str(captions[idx]), font, cell)
                draw.text((pad + c * (cell + pad), y + cell + 2), text, fill=(0, 0, 0), font=font)
    return out
