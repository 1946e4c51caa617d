"""Co-segmentation and co-localization metrics, dataset readers and ``dffkit eval``.

Metrics (numpy, on boolean masks and pixel boxes):

- ``jaccard(pred, gt)``: |pred ∩ gt| / |pred ∪ gt| (IoU); two empty masks score 1.
- ``precision(pred, gt)``: the co-segmentation benchmarks' "precision" (Rubinstein et al.
  2013, reported by the DFF paper on iCoseg): the fraction of pixels labelled correctly,
  foreground and background alike; ``convention="detection"`` gives TP / (TP + FP).
- ``box_iou(a, b)`` and ``corloc(pred_boxes, gt_boxes)``: the fraction of images whose
  predicted box overlaps some ground-truth box with IoU >= 0.5 (Deselaers et al. 2012).

Boxes are (x0, y0, x1, y1) in pixels with x1, y1 exclusive (a box covering pixel columns 0..9
has x0 = 0, x1 = 10); PASCAL VOC's 1-based inclusive coordinates are converted on reading.

Readers: ``read_icoseg(root)`` (images with ground-truth masks, grouped by folder) and
``read_voc(root)`` (JPEGImages + Annotations XML, grouped by class). ``load_mask`` reads grey,
palette, colour and alpha masks as the datasets store them (see its notes; VOC's "void" is
left out of the scores). Ground truth must be in its image's frame (EXIF orientation
applied): a uniform scale is repaired with a :class:`GroundTruthWarning`, another aspect ratio
is an error naming the file.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from dffkit.cli import positive_int, prepare_output_file

__all__ = [
    "jaccard",
    "precision",
    "box_iou",
    "corloc",
    "load_mask",
    "GroundTruthWarning",
    "MissingMaskWarning",
    "CosegSample",
    "BoxSample",
    "read_icoseg",
    "read_voc",
    "choose_concept",
    "evaluate_coseg",
    "evaluate_coloc",
    "CLI",
]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif")
_MASK_DIRS = ("GroundTruth", "ground_truth", "groundtruth", "gt", "GT", "masks", "Masks", "mask")
_IMAGE_DIRS = ("images", "Images", "JPEGImages", "img", "imgs")
_MASK_SUFFIXES = ("_mask", "_gt", "_GT", "-mask", "-gt")
# mask file extensions (lower case; matched in any case), the most mask-like first
_MASK_EXTENSIONS = (".png", ".bmp", ".gif", ".tif", ".tiff", ".jpg", ".jpeg")


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------

def _pair(pred, gt):
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in shape")
    return p, g


def jaccard(pred, gt) -> float:
    """Intersection over union of two boolean masks of one shape; 1.0 when both are empty."""
    p, g = _pair(pred, gt)
    union = np.count_nonzero(p | g)
    return 1.0 if union == 0 else np.count_nonzero(p & g) / union


def precision(pred, gt, convention: str = "coseg") -> float:
    """Precision of a mask against the ground truth.

    ``convention="coseg"`` (default, the co-segmentation benchmarks'): the fraction of all
    pixels whose foreground/background label is right. ``"detection"``: TP / (TP + FP), the
    fraction of predicted foreground that is foreground (1.0 for an empty prediction).
    """
    p, g = _pair(pred, gt)
    if convention == "coseg":
        return float(np.count_nonzero(p == g)) / max(p.size, 1)
    if convention == "detection":
        n = np.count_nonzero(p)
        return 1.0 if n == 0 else np.count_nonzero(p & g) / n
    raise ValueError(f"convention must be 'coseg' or 'detection', got {convention!r}")


def _box(b) -> Tuple[float, float, float, float]:
    if b is None or len(b) != 4:
        raise ValueError(f"a box is (x0, y0, x1, y1), got {b!r}")
    x0, y0, x1, y1 = (float(v) for v in b)
    return x0, y0, x1, y1


def box_iou(a, b) -> float:
    """IoU of two boxes (x0, y0, x1, y1), x1 and y1 exclusive; 0 when either is empty."""
    ax0, ay0, ax1, ay1 = _box(a)
    bx0, by0, bx1, by1 = _box(b)
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    area_a = max(0.0, ax1 - ax0) * max(0.0, ay1 - ay0)
    area_b = max(0.0, bx1 - bx0) * max(0.0, by1 - by0)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def corloc(pred_boxes: Sequence, gt_boxes: Sequence, threshold: float = 0.5) -> float:
    """Correct localization: the fraction of images whose predicted box (or None) has IoU
    >= ``threshold`` with at least one of the image's ground-truth boxes."""
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"{len(pred_boxes)} predicted boxes for {len(gt_boxes)} images")
    if not len(pred_boxes):
        raise ValueError("no images to score")
    hits = [_hit(p, g, threshold) for p, g in zip(pred_boxes, gt_boxes)]
    return float(np.mean(hits))


def _hit(pred, gts, threshold) -> bool:
    if pred is None:
        return False
    gts = np.asarray(gts, dtype=np.float64).reshape(-1, 4)
    return any(box_iou(pred, g) >= threshold for g in gts)


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------

class GroundTruthWarning(UserWarning):
    """Something in the ground truth that the scores depend on and that the reader had to guess
    or repair: an empty or full mask, a mask or boxes rescaled to the image."""


class MissingMaskWarning(GroundTruthWarning):
    """Images of a co-segmentation folder left out for want of a mask; ``images`` lists them."""

    def __init__(self, message: str, images: Sequence[str] = ()):
        super().__init__(message)
        self.images = list(images)


#: PASCAL VOC's "void" colour (palette index 255): object borders and unlabelled objects, which
#: VOC's own evaluation leaves out of the scores.
VOC_VOID = (224, 224, 192)
_GREY_THRESHOLD = 128   # grey masks: foreground from the middle of the 8-bit range up
_DARK = 32              # colour masks: foreground where the brightest channel reaches this
_GREY_SPREAD = 16       # an RGB mask whose channels stay this close is a grey mask
_OPAQUE = 128           # alpha below this: transparent, background


def _grey_foreground(values: np.ndarray) -> np.ndarray:
    return values > 0 if values.max(initial=0) <= 1 else values >= _GREY_THRESHOLD


def _mask_planes(im) -> Tuple[np.ndarray, np.ndarray]:
    """(foreground, void): boolean (H, W) planes of an opened mask image, read by its mode."""
    mode = im.mode
    if mode in ("1", "L", "I") or mode.startswith("I;16"):
        a = np.asarray(im)
        return _grey_foreground(a), np.zeros(a.shape, bool)
    if mode == "F":
        a = np.asarray(im.convert("L"))
        return _grey_foreground(a), np.zeros(a.shape, bool)
    if mode in ("LA", "La"):
        a = np.asarray(im.convert("LA"))
        opaque = a[..., 1] >= _OPAQUE
        if not opaque.all() and not np.any(a[..., 0][opaque] >= _DARK):  # a black stencil: its shape is the mask
            return opaque, np.zeros(opaque.shape, bool)
        return opaque & _grey_foreground(np.where(opaque, a[..., 0], 0)), np.zeros(opaque.shape, bool)
    # palette and colour images, through their colours (a palette's transparency included)
    has_alpha = mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info)
    rgba = np.asarray(im.convert("RGBA") if has_alpha else im.convert("RGB"))
    rgb = rgba[..., :3]
    opaque = rgba[..., 3] >= _OPAQUE if has_alpha else np.ones(rgb.shape[:2], bool)
    void = opaque & np.all(rgb == np.array(VOC_VOID, np.uint8), axis=-1)
    rest = opaque & ~void
    brightest = rgb.max(axis=-1)
    if not opaque.all() and not np.any(brightest[rest] >= _DARK):  # a black stencil: its shape is the mask
        return rest, void
    spread = brightest.astype(np.int16) - rgb.min(axis=-1)
    if not np.any(spread[rest] > _GREY_SPREAD):  # grey: read like an L mask
        fg = _grey_foreground(np.where(rest, brightest, 0))
    else:
        fg = brightest >= _DARK
    return rest & fg, void


def _hw(size, what: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (height, width) in pixels, got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{what} must be (height, width) in positive pixels, got {size!r}")
    return h, w


def _same_aspect(src: Tuple[int, int], dst: Tuple[int, int]) -> bool:
    """Whether (h, w) ``src`` is ``dst`` scaled uniformly, up to rounding each side to whole
    pixels (|h·W − w·H| within half a pixel of either frame's perimeter)."""
    (h, w), (H, W) = src, dst
    return abs(h * W - w * H) <= 0.5 * max(H + W, h + w)


def _frame_error(what: str, src: Tuple[int, int], image: str, dst: Tuple[int, int]) -> ValueError:
    (h, w), (H, W) = src, dst
    hint = ""
    if (h, w) == (W, H):
        hint = (" It is the image turned by 90 degrees: was it drawn on the photo as stored, before its EXIF "
                "orientation was applied? Turn it the same way.")
    return ValueError(f"{what} is {w} x {h} pixels (width x height) but {image} is {W} x {H}: their aspect ratios "
                      f"differ, so the ground truth is not in the image's frame and cannot be scored.{hint} "
                      "Fix or remove this ground truth")


def load_mask(path, size: Optional[Tuple[int, int]] = None, *, return_void: bool = False):
    """A ground-truth mask as a boolean (H, W) array, True on the object, read the way the
    datasets store masks:

    - grey masks (modes 1, L, I, I;16): values only 0 and 1 as they are, others as
      value >= 128 (the middle of the 8-bit range, also for 16-bit masks, so that one
      holding 0/255 and one holding 0/65535 read alike; JPEG-compressed masks included);
    - palette masks (P) through their palette colours, colour masks (RGB) as they are: the
      object is wherever the colour is not black (the brightest channel >= 32, so JPEG noise
      around black stays background), any colour, so VOC-style class colours and iCoseg's
      palettes read right whatever index a colour has. A palette or RGB mask whose colours are
      all grey (channels within 16 of each other) is read like a grey mask;
    - alpha (RGBA, LA, PA, a palette's transparency): transparent pixels (alpha < 128) are
      background, whatever their colour; where every opaque pixel is black (a black shape on a
      transparent background), the opaque pixels are the object;
    - PASCAL VOC's "void" colour (224, 224, 192), palette index 255 (object borders and
      unlabelled objects), is background in the mask; ``return_void=True`` also returns it,
      so that the scores can leave those pixels out as VOC's own evaluation does.

    ``size`` (H, W): the image's size. A mask of another size with the same aspect ratio
    is resized to it (nearest neighbour) with a :class:`GroundTruthWarning`; a mask whose
    aspect ratio differs (a transposed mask included) raises ValueError naming the file. A
    mask with no foreground pixel, or with nothing but foreground (void aside), gives a
    GroundTruthWarning naming the file: such a mask is usually one stored in a way this
    reader does not expect.

    Returns the (H, W) bool mask, or ``(mask, void)`` with ``return_void``.
    """
    from PIL import Image

    with Image.open(path) as im:
        if size is not None:
            hw = _hw(size, "size")
            own = (im.height, im.width)
            if own != hw:
                if not _same_aspect(own, hw):
                    raise _frame_error(f"ground-truth mask {path}", own, "the image", hw)
                warnings.warn(f"ground-truth mask {path} is {own[1]} x {own[0]} pixels, the image {hw[1]} x {hw[0]}: "
                              "same aspect ratio, resized to the image (nearest neighbour)",
                              GroundTruthWarning, stacklevel=2)
                im = im.resize((hw[1], hw[0]), Image.NEAREST)
        mask, void = _mask_planes(im)
    if not mask.any():
        warnings.warn(f"ground-truth mask {path} is empty: no pixel reads as foreground (object = non-black, "
                      "opaque pixels; grey masks >= 128); check how the file stores the object, or leave it out",
                      GroundTruthWarning, stacklevel=2)
    elif mask[~void].all():
        warnings.warn(f"ground-truth mask {path} covers the whole image: every pixel reads as foreground "
                      "(object = non-black, opaque pixels; grey masks >= 128); check that its background is black "
                      "or transparent, or leave it out", GroundTruthWarning, stacklevel=2)
    return (mask, void) if return_void else mask


def _image_size(path) -> Optional[Tuple[int, int]]:
    """(H, W) of an image file as :func:`dffkit.images.load_image` reads it (EXIF orientation
    applied), from its header; None where the file cannot be read (the DFF run says why)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            h, w = im.height, im.width
            try:
                orientation = im.getexif().get(0x0112, 1)
            except Exception:  # EXIF Pillow cannot parse: load_image applies no orientation either
                orientation = 1
    except (OSError, ValueError, TypeError):
        return None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def _mask_size(path) -> Optional[Tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, ValueError, TypeError):
        return None


@dataclass
class CosegSample:
    """One image of a co-segmentation set and its ground-truth mask."""

    image: str
    mask: str
    group: str

    def load_mask(self, size=None, *, return_void: bool = False):
        return load_mask(self.mask, size, return_void=return_void)


@dataclass
class BoxSample:
    """One image of a co-localization set: its boxes (n, 4) (x0, y0, x1, y1; x1, y1
    exclusive) with class names and 'difficult' flags; ``size`` (H, W) is the frame the
    boxes are in (VOC's ``<size>``), ``annotation`` the file they were read from."""

    image: str
    boxes: np.ndarray
    names: List[str] = field(default_factory=list)
    difficult: List[bool] = field(default_factory=list)
    size: Optional[Tuple[int, int]] = None
    annotation: Optional[str] = None


def _in_image_frame(sample: BoxSample, image_hw: Optional[Tuple[int, int]]) -> BoxSample:
    """``sample`` with its boxes in the frame of the image (H, W): unchanged where the
    annotation's size is that of the image or unknown, rescaled with a GroundTruthWarning
    where it is a uniform scale of it; ValueError naming both files where the aspect ratio
    differs."""
    if sample.size is None or image_hw is None or tuple(sample.size) == tuple(image_hw):
        return sample
    source = sample.annotation or f"the annotation of {sample.image}"
    (h, w), (H, W) = sample.size, image_hw
    if not _same_aspect((h, w), (H, W)):
        raise _frame_error(f"{source}: <size>", (h, w), f"image {sample.image}", (H, W))
    warnings.warn(f"{source}: <size> says {w} x {h} pixels but image {sample.image} is {W} x {H}: same aspect "
                  f"ratio, boxes rescaled to the image (x by {W / w:.4g}, y by {H / h:.4g})",
                  GroundTruthWarning, stacklevel=3)
    scale = np.array([W / w, H / h, W / w, H / h])
    return BoxSample(sample.image, np.asarray(sample.boxes, np.float64) * scale, list(sample.names),
                     list(sample.difficult), (H, W), sample.annotation)


def _images_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def _listing(folder: Path, cache: Dict[Path, Dict[Tuple[str, str], Path]]) -> Dict[Tuple[str, str], Path]:
    """The files in ``folder`` by (stem, lower-case suffix) (empty for a missing folder)."""
    if folder not in cache:
        files = {}
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.is_file():
                    files.setdefault((p.stem, p.suffix.lower()), p)
        cache[folder] = files
    return cache[folder]


def _find_mask(image: Path, candidate_dirs: Sequence[Path], cache) -> Optional[Path]:
    """The mask of ``image``: the first of ``candidate_dirs`` holding a file named after the
    image's stem (or the stem with a mask suffix) with a mask extension, in any case. In the
    image's own folder a file of the same stem is its mask only when its extension comes
    before the image's in ``_MASK_EXTENSIONS`` (x.jpg's mask is x.png, never the reverse)."""
    own_rank = _MASK_EXTENSIONS.index(image.suffix.lower()) if image.suffix.lower() in _MASK_EXTENSIONS else None
    for d in candidate_dirs:
        files = _listing(d, cache)
        if not files:
            continue
        same_folder = d == image.parent
        for rank, suffix in enumerate(_MASK_EXTENSIONS):
            for stem in (image.stem, *(image.stem + m for m in _MASK_SUFFIXES)):
                p = files.get((stem, suffix))
                if p is None or p == image:
                    continue
                if same_folder and stem == image.stem and own_rank is not None and rank >= own_rank:
                    continue
                return p
    return None


def _listed(names: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def read_icoseg(root, groups: Optional[Sequence[str]] = None) -> Dict[str, List[CosegSample]]:
    """Images and ground-truth masks of an iCoseg-style folder, grouped.

    Layouts understood (masks matched by file stem, also with ``_mask``/``_gt`` suffixes, and
    by extension in any case: ``IMG0.PNG`` is the mask of ``IMG0.JPG``):

    - ``root/<group>/<image>.jpg`` with masks in ``root/<group>/GroundTruth/`` (iCoseg's
      own layout; also ``ground_truth``, ``gt``, ``masks``), or next to the image as
      ``<image>_mask.png`` or ``<image>.png`` (a same-stem file next to the image is its mask
      when its extension is more mask-like: png, bmp, gif, tif, then jpg);
    - ``root/images/<group>/...`` with ``root/ground_truth/<group>/...`` (or ``masks``,
      ``GroundTruth``) as a parallel tree.

    A group is the folder holding the images (its path relative to ``root``); ``groups``
    keeps only those (ValueError naming the ones not found and the ones there). A file that
    is some image's mask is never listed as an image. Images without a mask are left out with a
    :class:`MissingMaskWarning` (their count, a few names, and the full list in its
    ``images``). Raises FileNotFoundError / ValueError when nothing is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such dataset folder: {root}")
    image_tree = next((root / d for d in _IMAGE_DIRS if (root / d).is_dir()), None)
    mask_tree = next((root / d for d in _MASK_DIRS if (root / d).is_dir()), None)
    found: Dict[str, List[CosegSample]] = {}
    unmasked: Dict[str, List[Path]] = {}
    parallel = image_tree is not None and mask_tree is not None
    base = image_tree if parallel else root
    folders = [base] + sorted(p for p in base.rglob("*") if p.is_dir() and p.name not in _MASK_DIRS
                              and not any(part in _MASK_DIRS for part in p.relative_to(base).parts))
    cache: Dict[Path, Dict[Tuple[str, str], Path]] = {}
    for folder in folders:
        rel = folder.relative_to(base)
        group = rel.as_posix() if rel.parts else root.name
        dirs = [folder / d for d in _MASK_DIRS] + [folder]
        if parallel:
            dirs = [mask_tree / rel] + dirs
        images = [p for p in _images_in(folder) if not p.stem.endswith(_MASK_SUFFIXES)]
        pairs = [(image, _find_mask(image, dirs, cache)) for image in images]
        masks = {mask for _, mask in pairs if mask is not None}
        for image, mask in pairs:
            if image in masks:  # some image's mask, not an image
                continue
            if mask is None:
                unmasked.setdefault(group, []).append(image)
            else:
                found.setdefault(group, []).append(CosegSample(str(image), str(mask), group))
    if groups is not None:
        wanted = [groups] if isinstance(groups, str) else list(groups)
        missing = [g for g in wanted if g not in found]
        if missing:
            there = sorted(found)
            raise ValueError(
                f"group{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} not found under {root} "
                f"(groups requested: {', '.join(wanted)}); groups with ground-truth masks there: "
                f"{_listed(there, 20) if there else 'none'} (a group is a folder of images, named by its path "
                "under the dataset folder)")
        found = {g: found[g] for g in wanted}
        unmasked = {g: unmasked[g] for g in wanted if g in unmasked}
    skipped = [str(p) for g in sorted(unmasked) for p in unmasked[g]]
    if not found:
        raise ValueError(
            f"no images with ground-truth masks found under {root}"
            + (f" ({len(skipped)} images without one, e.g. {_listed(skipped, 3)})" if skipped else "")
            + " (expected <group>/<image>.jpg with masks in <group>/GroundTruth/, or images/ and ground_truth/ trees)"
        )
    if skipped:
        names = [Path(s).relative_to(root).as_posix() for s in skipped]
        warnings.warn(MissingMaskWarning(
            f"{len(skipped)} image{'s' if len(skipped) != 1 else ''} under {root} without a ground-truth mask "
            f"left out: {_listed(names)} (a mask has the image's file stem, in GroundTruth/ or next to the image)",
            skipped), stacklevel=2)
    return found


def _voc_number(obj, tag) -> float:
    el = obj.find(tag)
    if el is None or el.text is None:
        raise ValueError(f"missing <{tag}>")
    return float(el.text)


def read_voc_annotation(path) -> BoxSample:
    """One PASCAL VOC XML file: boxes converted to 0-based (x0, y0, x1, y1), x1 and y1
    exclusive (VOC's xmin - 1, ymin - 1, xmax, ymax). ``image`` is the file name in it."""
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise ValueError(f"{path}: not a readable XML annotation ({e})") from e
    ann = tree.getroot()
    filename = (ann.findtext("filename") or Path(path).stem + ".jpg").strip()
    size = None
    size_el = ann.find("size")
    if size_el is not None and size_el.findtext("height") and size_el.findtext("width"):
        height, width = size_el.findtext("height").strip(), size_el.findtext("width").strip()
        try:
            size = (int(float(height)), int(float(width)))
        except ValueError as e:
            raise ValueError(f"{path}: <size> must hold numbers, got height {height!r} and width {width!r} ({e}); "
                             "fix or remove the <size> element") from e
    boxes, names, difficult = [], [], []
    for obj in ann.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            xmin, ymin = _voc_number(bb, "xmin"), _voc_number(bb, "ymin")
            xmax, ymax = _voc_number(bb, "xmax"), _voc_number(bb, "ymax")
        except ValueError as e:
            raise ValueError(f"{path}: object without a complete box ({e})") from e
        boxes.append((xmin - 1, ymin - 1, xmax, ymax))
        names.append((obj.findtext("name") or "").strip())
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    return BoxSample(filename, np.array(boxes, dtype=np.float64).reshape(-1, 4), names, difficult, size, str(path))


def read_voc(root, classes: Optional[Sequence[str]] = None, image_set: Optional[str] = None,
             skip_difficult: bool = True) -> Dict[str, List[BoxSample]]:
    """A PASCAL-VOC-style folder (``Annotations/*.xml``, ``JPEGImages/``, optionally
    ``ImageSets/Main/<image_set>.txt``), grouped by class for co-localization: group c holds
    every image with an object of class c, with only that class's boxes (difficult ones
    dropped when ``skip_difficult``, and images left with none skipped)."""
    root = Path(root)
    ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
    if not ann_dir.is_dir():
        raise FileNotFoundError(f"{root} has no Annotations/ folder (PASCAL VOC layout: Annotations/, JPEGImages/)")
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{root} has no JPEGImages/ folder (PASCAL VOC layout: Annotations/, JPEGImages/)")
    if image_set is not None:
        listing = root / "ImageSets" / "Main" / f"{image_set}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"no image set {listing}")
        ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
        xmls = [ann_dir / f"{i}.xml" for i in ids]
    else:
        xmls = sorted(ann_dir.glob("*.xml"))
    found: Dict[str, List[BoxSample]] = {}
    for xml in xmls:
        if not xml.is_file():
            raise FileNotFoundError(f"missing annotation {xml}")
        ann = read_voc_annotation(xml)
        image = img_dir / ann.image
        if not image.is_file():
            image = next((img_dir / (xml.stem + s) for s in _IMAGE_SUFFIXES if (img_dir / (xml.stem + s)).is_file()), image)
        if not image.is_file():
            raise FileNotFoundError(f"{xml.name} names image {ann.image}, not found in {img_dir}")
        for c in sorted(set(ann.names)):
            keep = [i for i, n in enumerate(ann.names) if n == c and not (skip_difficult and ann.difficult[i])]
            if keep:
                found.setdefault(c, []).append(BoxSample(str(image), ann.boxes[keep], [c] * len(keep),
                                                         [ann.difficult[i] for i in keep], ann.size, str(xml)))
    if not found:
        raise ValueError(f"no annotated objects found under {root}")
    if classes is None:
        return found
    wanted = [classes] if isinstance(classes, str) else list(classes)
    missing = [c for c in wanted if c not in found]
    if missing:
        raise ValueError(
            f"class{'es' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} not found under {root} "
            f"(classes requested: {', '.join(wanted)}); classes with objects there"
            f"{' (difficult ones left out)' if skip_difficult else ''}: {_listed(sorted(found), 20)}")
    return {c: found[c] for c in wanted}


# ---------------------------------------------------------------------------------------------
# evaluation of DFF
# ---------------------------------------------------------------------------------------------

def _center_score(result, j, images: Optional[Sequence[int]] = None) -> float:
    """How much of concept j's heat lies in the central half of the images rather than near
    their borders (objects of co-localization sets are mostly central)."""
    scores = []
    for i in range(result.n_images) if images is None else images:
        m = result.heatmaps[i][j] * result.strength[i, j]
        H, W = m.shape
        inner = m[H // 4: H - H // 4, W // 4: W - W // 4]
        total = m.sum()
        scores.append(inner.sum() / total if total > 0 else 0.0)
    return float(np.mean(scores))


def choose_concept(result, how: str = "oracle", score=None, images: Optional[Sequence[int]] = None) -> int:
    """Which concept stands for the object (in ``images``, default all).

    ``"oracle"``: the concept with the best ``score(j)`` against the ground truth (an upper
    bound, the convention of the issue's tests); ``"center"``: the concept, among those
    present in at least half of the images, whose heat lies most in the image centres — no
    ground truth used.
    """
    k = result.n_concepts
    if how == "oracle":
        if score is None:
            raise ValueError("choose='oracle' needs the ground truth")
        return int(np.argmax([score(j) for j in range(k)]))
    if how == "center":
        candidates = list(range(k))
        if images is None:
            consistency = result.concept_consistency()
            candidates = [j for j in range(k) if consistency[j] >= 0.5] or candidates
        return max(candidates, key=lambda j: _center_score(result, j, images))
    raise ValueError(f"choose must be 'oracle' or 'center', got {how!r}")


def _evaluate(task, metric, samples, n_concepts, choose, result, dff_kwargs, predict, score) -> dict:
    """Run DFF (unless ``result`` is given), pick the object's concept and score it.

    ``predict(result, j)``: concept j's prediction per image; ``score(prediction, i)``: a
    dict of metrics for image i whose ``metric`` entry decides the oracle's choice. Joint
    results use one concept for all images; per-image results choose in each image.
    """
    from dffkit.deep_feature_factorization import dff

    if not samples:
        raise ValueError("no samples to evaluate")
    if result is None:
        result = dff([s.image for s in samples], n_concepts, **dff_kwargs)
    if result.n_images != len(samples):
        raise ValueError(f"the result holds {result.n_images} images for {len(samples)} samples")
    k, n = result.n_concepts, len(samples)
    predictions = [predict(result, j) for j in range(k)]
    scores = [[score(predictions[j][i], i) for i in range(n)] for j in range(k)]
    table = np.array([[row[metric] for row in per_image] for per_image in scores], dtype=np.float64)  # (k, n)
    if result.mode == "joint":
        chosen = [choose_concept(result, choose, score=lambda c: table[c].mean())] * n
    else:
        chosen = [choose_concept(result, choose, score=lambda c: table[c, i], images=[i]) for i in range(n)]
    rows = [{"image": s.image, "concept": chosen[i], **scores[chosen[i]][i]} for i, s in enumerate(samples)]
    means = {key: float(np.mean([r[key] for r in rows])) for key, v in rows[0].items()
             if key not in ("concept", "image") and isinstance(v, (bool, int, float, np.floating))}
    return {
        "task": task,
        "n_images": n,
        "mode": result.mode,
        "concept": chosen[0] if result.mode == "joint" else None,
        "concept_name": result.concept_names[chosen[0]] if result.mode == "joint" else None,
        "choose": choose,
        **means,
        f"per_concept_{metric}": table.mean(axis=1).tolist(),
        "per_image": rows,
        "model": result.model_name,
        "layer": result.layer,
        "untrained": bool(result.untrained),
    }


def _fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def _check_choose(choose) -> None:
    if choose not in ("oracle", "center"):
        raise ValueError(f"choose must be 'oracle' or 'center', got {choose!r}")


def _frames(samples, result) -> List[Optional[Tuple[int, int]]]:
    """Each sample's image size (H, W): ``result``'s where given (after checking it holds
    one image per sample), else read from the image files' headers (None where unreadable)."""
    if not samples:
        raise ValueError("no samples to evaluate")
    if result is None:
        return [_image_size(s.image) for s in samples]
    if result.n_images != len(samples):
        raise ValueError(f"the result holds {result.n_images} images for {len(samples)} samples")
    sizes = getattr(result, "image_sizes", None)
    return [tuple(hw) for hw in sizes] if sizes is not None else [None] * len(samples)


def evaluate_coseg(samples: Sequence[CosegSample], n_concepts: int = 3, *, choose: str = "oracle",
                   mask_threshold: float = 0.5, result=None, **dff_kwargs) -> dict:
    """Run DFF on a co-segmentation group and score the object concept's masks
    (``result.masks(concept, mask_threshold)``) by Jaccard and precision; ``result`` scores
    an existing DFFResult of the same images instead, ``dff_kwargs`` go to
    :func:`dffkit.dff`.

    Ground truth is read by :func:`load_mask`, at the image's size: a mask of another aspect
    ratio than its image raises ValueError (checked from the files' headers before DFF runs).
    Pixels of VOC's "void" colour are left out of both scores.

    Returns a dict: ``concept`` (joint mode; per image in ``per_image``), ``jaccard`` and
    ``precision`` (means over images), ``per_concept_jaccard``, ``per_image`` rows, and
    the model used.
    """
    mask_threshold = _fraction("mask_threshold", mask_threshold)
    _check_choose(choose)
    for sample, hw in zip(samples, _frames(samples, result)):
        own = _mask_size(sample.mask) if hw is not None else None
        if own is not None and own != hw and not _same_aspect(own, hw):
            raise _frame_error(f"ground-truth mask {sample.mask}", own, f"image {sample.image}", hw)
    gts = {}

    def score(mask, i):
        if i not in gts:
            gt, void = samples[i].load_mask(mask.shape, return_void=True)
            gts[i] = (gt, None) if not void.any() else (gt[~void], ~void)
        gt, keep = gts[i]
        pred = mask if keep is None else mask[keep]
        return {"jaccard": jaccard(pred, gt), "precision": precision(pred, gt)}

    report = _evaluate("co-segmentation", "jaccard", samples, n_concepts, choose, result, dff_kwargs,
                       lambda r, j: r.masks(j, mask_threshold), score)
    report["mask_threshold"] = mask_threshold
    return report


def evaluate_coloc(samples: Sequence[BoxSample], n_concepts: int = 3, *, choose: str = "oracle",
                   mask_threshold: float = 0.5, iou: float = 0.5, result=None, **dff_kwargs) -> dict:
    """Run DFF on a co-localization group and score the object concept's boxes (the box of
    the largest connected region of its mask) by CorLoc: ``corloc`` is the fraction of
    images whose box has IoU >= ``iou`` with one of their ground-truth boxes.

    Boxes annotated in another frame than the image's (a sample's ``size``, VOC's
    ``<size>``, against the image's EXIF-corrected size) are rescaled to the image when the
    two differ by a uniform scale (with a :class:`GroundTruthWarning`), and raise ValueError
    naming the annotation when their aspect ratios differ; checked before DFF runs."""
    mask_threshold = _fraction("mask_threshold", mask_threshold)
    iou = _fraction("iou", iou)
    _check_choose(choose)
    samples = [_in_image_frame(s, hw) for s, hw in zip(samples, _frames(samples, result))]

    def score(box, i):
        return {"corloc": float(_hit(box, samples[i].boxes, iou)), "box": None if box is None else list(box)}

    report = _evaluate("co-localization", "corloc", samples, n_concepts, choose, result, dff_kwargs,
                       lambda r, j: r.boxes(j, mask_threshold), score)
    report.update(mask_threshold=mask_threshold, iou=iou)
    return report


# ---------------------------------------------------------------------------------------------
# dffkit eval
# ---------------------------------------------------------------------------------------------

def _detect_format(root: Path) -> str:
    if (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir():
        return "voc"
    return "icoseg"


def _eval_arguments(p):
    p.add_argument("dataset", help="an iCoseg-style folder (images + masks) or a PASCAL-VOC-style folder "
                                   "(JPEGImages + Annotations)")
    p.add_argument("--format", choices=("auto", "icoseg", "voc"), default="auto")
    p.add_argument("-k", "--concepts", type=int, default=3, dest="k", help="concepts per group (default 3)")
    p.add_argument("--model", default=None, help="ONNX model, 'filterbank' (default) or 'vgg16'")
    p.add_argument("--layer", default=None)
    p.add_argument("--per-image", action="store_true", help="factorize each image on its own")
    p.add_argument("--choose", choices=("oracle", "center"), default="oracle",
                   help="which concept is the object: best against the ground truth (oracle, an upper "
                        "bound) or the most central consistent one (no ground truth)")
    p.add_argument("--threshold", type=float, default=0.5, help="mask threshold on the heat maps")
    p.add_argument("--group", action="append", default=None,
                   help="only these groups (iCoseg folders / VOC classes); repeatable")
    p.add_argument("--image-set", default=None, help="VOC: ImageSets/Main/<name>.txt to use")
    p.add_argument("--max-images", type=positive_int("images per group"), default=None,
                   help="at most this many images per group, a positive int (default: all)")
    p.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=positive_int("pixels"), default=None,
                   help="resize images to this square size in pixels for the network, a positive int "
                        "(default: the extractor's, 224 for the built-in models)")
    p.add_argument("--out", default="dff_eval.json", help="where to write the metrics (JSON)")


def _group_positions(ext, n_images: int, per_image: bool) -> Optional[int]:
    """The most concepts DFF can find in a group of ``n_images`` images with extractor ``ext``
    (its number of feature positions: n·h·w jointly, h·w per image), from shape inference at
    the extractor's fixed image size, without running it; None where that is not known
    cheaply (images resized to sizes of their own, or a model shape inference cannot follow)."""
    hw = getattr(ext, "image_size", None)
    if getattr(ext, "resize", "fixed") != "fixed" or not isinstance(hw, tuple) or not hasattr(ext, "output_shape"):
        return None
    try:
        shape = ext.output_shape(hw)
    except Exception:  # shape inference is a convenience here: the run itself tells
        return None
    if shape is None:
        return None
    positions = int(shape[1]) * int(shape[2])
    return positions if per_image else positions * n_images


def _check_k_fits(k: int, ext, groups: Dict[str, list], per_image: bool) -> None:
    """ValueError, before any group is computed, naming the groups too small for k concepts
    and the largest k that all groups allow."""
    limits = {name: _group_positions(ext, len(samples), per_image) for name, samples in groups.items()}
    known = {name: n for name, n in limits.items() if n is not None}
    too_small = sorted(name for name, n in known.items() if k > n)
    if not too_small:
        return
    grid = "feature positions per image" if per_image else "feature positions (images x feature grid)"
    listed = ", ".join(f"{name} ({len(groups[name])} image{'s' if len(groups[name]) != 1 else ''}: at most "
                       f"{known[name]})" for name in too_small[:10])
    if len(too_small) > 10:
        listed += f" and {len(too_small) - 10} more"
    raise ValueError(
        f"-k {k} is larger than the number of {grid} of group{'s' if len(too_small) > 1 else ''} {listed}; "
        f"the largest k every group allows is {min(known.values())}: pass -k {min(known.values())} or less, "
        "a larger --image-size, or leave those groups out with --group"
    )


@contextlib.contextmanager
def _ground_truth_warnings(notices: List[str], skipped: Optional[List[str]] = None):
    """Ground-truth warnings raised inside, each printed as a ``dffkit eval: warning: ...``
    line and kept in ``notices`` (the images a MissingMaskWarning names in ``skipped``);
    other warnings are shown as usual."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", GroundTruthWarning)
        show = warnings.showwarning

        def report(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, GroundTruthWarning):
                return show(message, category, filename, lineno, file, line)
            notices.append(str(message))
            print(f"dffkit eval: warning: {message}", file=sys.stderr)
            if skipped is not None and isinstance(message, MissingMaskWarning):
                skipped.extend(message.images)

        warnings.showwarning = report
        yield


def _concepts_chosen(report: dict) -> str:
    """The concept a group's report scored: one in joint mode; in per-image mode, each concept
    chosen with the number of images it was chosen in."""
    if report.get("concept") is not None:
        return f"concept {report['concept']}"
    counts: Dict[int, int] = {}
    for row in report.get("per_image", []):
        counts[row["concept"]] = counts.get(row["concept"], 0) + 1
    return "concepts per image: " + ", ".join(f"{c} in {n}" for c, n in sorted(counts.items()))


def run_eval(args) -> int:
    """``dffkit eval DATASET``: DFF per group, metrics printed and written as JSON.

    Everything that can be checked cheaply is checked before the first group is computed
    (the options, the groups asked for, the output file, k against every group's number of
    feature positions); a group that still fails is reported in the JSON (``failed``) and on
    stderr, the other groups are evaluated, and the exit status is 1. Ground-truth warnings
    (images without a mask, empty or full masks, rescaled ground truth) are printed as
    ``dffkit eval: warning:`` lines and kept in the JSON (``warnings``, ``skipped_images``)."""
    from dffkit.deep_feature_factorization import _build_extractor, _check_k, _model_note, _model_name

    _check_k(args.k)
    root = Path(args.dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"no such dataset folder: {root}")
    fmt = _detect_format(root) if args.format == "auto" else args.format
    notices: List[str] = []
    skipped: List[str] = []
    with _ground_truth_warnings(notices, skipped):
        if fmt == "voc":
            groups = read_voc(root, classes=args.group, image_set=args.image_set)
        else:
            groups = read_icoseg(root, groups=args.group)
    groups = {name: groups[name][: args.max_images] if args.max_images is not None else groups[name]
              for name in sorted(groups)}
    args.quiet = True
    ext = _build_extractor(args)
    _check_k_fits(args.k, ext, groups, args.per_image)
    out = prepare_output_file(args.out)
    note = _model_note(_model_name(ext), getattr(ext, "untrained", False))
    if note:
        print(f"note: {note}", file=sys.stderr)
    reports, failed = [], []
    for name, samples in groups.items():
        kwargs = dict(extractor=ext, mode="per_image" if args.per_image else "joint", backend=args.backend,
                      random_state=args.seed, threshold=0.2, name_concepts=False)
        try:
            with _ground_truth_warnings(notices):
                if fmt == "voc":
                    rep = evaluate_coloc(samples, args.k, choose=args.choose, mask_threshold=args.threshold, **kwargs)
                    line = f"CorLoc {rep['corloc']:.3f}"
                else:
                    rep = evaluate_coseg(samples, args.k, choose=args.choose, mask_threshold=args.threshold, **kwargs)
                    line = f"Jaccard {rep['jaccard']:.3f}  precision {rep['precision']:.3f}"
        except (ValueError, OSError) as exc:  # this group's data: the others are still evaluated
            from dffkit.cli import _message

            failed.append({"group": name, "n_images": len(samples), "error": _message(exc)})
            print(f"{name:<30} {len(samples):4d} images  FAILED: {_message(exc)}", file=sys.stderr)
            continue
        rep["group"] = name
        reports.append(rep)
        print(f"{name:<30} {len(samples):4d} images  {_concepts_chosen(rep)}  {line}")
    key = "corloc" if fmt == "voc" else "jaccard"
    summary = {
        "dataset": str(root),
        "format": fmt,
        "n_concepts": args.k,
        "choose": args.choose,
        "model": _model_name(ext),
        "layer": ext.layer,
        "untrained": bool(getattr(ext, "untrained", False)),
        "note": note,
        "mean": {key: float(np.mean([r[key] for r in reports]))} if reports else {},
        "groups": reports,
        "failed": failed,
        "warnings": notices,
        "skipped_images": skipped,
    }
    if fmt != "voc" and reports:
        summary["mean"]["precision"] = float(np.mean([r["precision"] for r in reports]))
    if reports:
        means = ", ".join(f"{k} {v:.3f}" for k, v in summary["mean"].items())
        print(f"mean over {len(reports)} group{'s' if len(reports) != 1 else ''}: {means}")
    out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out.resolve()}")
    if failed:
        print(f"dffkit eval: error: {len(failed)} of {len(groups)} groups failed ("
              + ", ".join(f["group"] for f in failed[:10]) + (" ..." if len(failed) > 10 else "")
              + f"); their errors are listed under \"failed\" in {out}", file=sys.stderr)
        return 1
    return 0


CLI = {
    "eval": (_eval_arguments, run_eval,
             "score DFF co-segmentation (Jaccard, precision) or co-localization (CorLoc) on an iCoseg- or "
             "PASCAL-VOC-style folder"),
}
