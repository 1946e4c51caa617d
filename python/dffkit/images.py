"""Reading images into RGB and turning them into network input.

Everything here is Pillow and numpy. ``load_images`` takes file paths, file objects, PIL
images or integer arrays and returns RGB PIL images with their EXIF orientation applied;
``preprocess`` resizes them and normalises them into one float32 (N, 3, H, W) array.

Mode conversions (all to 8-bit RGB):

- ``1``, ``L``, ``P``, ``YCbCr``, ``HSV``, ``CMYK``: Pillow's own conversion. CMYK uses
  R = (255 - C)(255 - K) / 255 (Adobe's inverted CMYK JPEGs are un-inverted by Pillow's
  decoder); an embedded ICC profile, when present and LittleCMS is available, is used
  instead.
- ``LA``, ``RGBA``, ``PA`` and palette images with transparency: composited over white.
- 16-bit (``I;16*``) and 32-bit integer (``I``) images: divided by 257 (65535 -> 255);
  ``I`` images whose values all lie in 0..255 are taken as 8-bit. ``F`` images: values in
  0..1 are scaled by 255, values in 0..255 kept, anything else min-max scaled.
- ``LAB``: through LittleCMS to sRGB.

Arrays: uint8 or uint16, shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (RGBA, composited
over white); uint16 values are divided by 257. A 4-D array (N, H, W, C) is N images.
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CAFFE_MEAN_BGR",
    "NORMALIZATIONS",
    "load_image",
    "load_images",
    "to_rgb",
    "resize_image",
    "resized_size",
    "normalize",
    "preprocess",
    "resize_batch",
    "resized_batches",
    "default_workers",
    "image_sizes",
    "as_image_list",
]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
#: Caffe / Keras ``preprocess_input`` for VGG: BGR, 0..255, mean subtracted, no scaling.
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
NORMALIZATIONS = ("imagenet", "caffe", "unit", "none")


def _pil():
    from PIL import Image

    return Image


def _describe(item) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, np.ndarray):
        return f"array {item.shape} {item.dtype}"
    name = getattr(item, "filename", None) or getattr(item, "name", None)
    if isinstance(name, str) and name:
        return name
    return type(item).__name__


def _flatten_alpha(img, mode_with_alpha: str):
    Image = _pil()
    rgba = img.convert(mode_with_alpha).convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _from_wide_ints(a: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    a = a.astype(np.float64)
    if not sixteen_bit and a.size and a.min() >= 0 and a.max() <= 255:
        return np.round(a).astype(np.uint8)
    return np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)


def _from_float(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(a.astype(np.float64))
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo >= 0 and hi <= 1:
        a = a * 255.0
    elif not (lo >= 0 and hi <= 255):
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def to_rgb(img):
    """Convert a PIL image of any mode to 8-bit RGB (see the module notes for each mode)."""
    Image = _pil()
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _flatten_alpha(img, "RGBA" if mode in ("RGBA", "RGBa", "PA") else "LA")
    if mode == "P":
        if "transparency" in img.info:
            return _flatten_alpha(img, "RGBA")
        return img.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        gray = _from_wide_ints(np.asarray(img), sixteen_bit=mode != "I")
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(_from_float(np.asarray(img)), "L").convert("RGB")
    if mode == "CMYK" and img.info.get("icc_profile"):
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # no LittleCMS or a broken profile: the formula below
            pass
    if mode == "LAB":
        from PIL import ImageCms

        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(img, transform)
    return img.convert("RGB")


def _dtype_advice(dtype: np.dtype) -> str:
    """How to turn an image array of ``dtype`` (not uint8 or uint16) into one ``load_image`` reads."""
    if dtype.kind == "b":
        return "a boolean array is a mask, not a picture: pass x.astype(np.uint8) * 255 for a black-and-white image"
    if dtype.kind in "iu":
        return ("convert it to the type its values fit: x.astype(np.uint8) for values in 0..255, x.astype(np.uint16) "
                "for 16-bit values in 0..65535 (np.clip(x, 0, 255) first if some fall outside)")
    if dtype.kind == "f":
        return "convert floats yourself (e.g. (x * 255).round().astype(np.uint8) for values in 0..1)"
    return "pass pixel values as a uint8 array"


def _array_to_pil(a: np.ndarray):
    Image = _pil()
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {a.shape}")
    if a.dtype == np.uint16:
        a = np.clip(np.round(a.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0..255) or uint16 (0..65535), got {a.dtype}; {_dtype_advice(a.dtype)}")
    if 0 in a.shape[:2]:
        raise ValueError(f"zero-size image (shape {a.shape})")
    a = np.ascontiguousarray(a)
    if a.ndim == 2:
        return Image.fromarray(a, "L").convert("RGB")
    if a.shape[2] == 4:
        return to_rgb(Image.fromarray(a, "RGBA"))
    return Image.fromarray(a, "RGB")


def _bomb_message(e) -> str:
    Image = _pil()
    return (
        f"too many pixels for Pillow ({e}); if you trust the image, raise Pillow's limit: "
        f"PIL.Image.MAX_IMAGE_PIXELS = None, or a number of pixels above {Image.MAX_IMAGE_PIXELS}"
    )


def _open(item):
    Image = _pil()
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such image file: {path}")
        if os.path.isdir(path):
            raise ValueError("is a directory, not an image file")
        source, what = path, "file"
    else:
        source, what = item, "data"
    try:
        img = Image.open(source)
    except Image.UnidentifiedImageError:
        raise ValueError("not an image file Pillow can read" if what == "file" else "not an image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ValueError(_bomb_message(e)) from e
    except OSError as e:  # unreadable file, or data cut short before the image's header ends
        raise ValueError(f"cannot read: {e}" if what == "file" else f"truncated or corrupt image ({e})") from e
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise ValueError(_bomb_message(e)) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"truncated or corrupt image ({e})") from e
    return img


#: EXIF orientation (tag 0x0112) -> the transposition that makes the image upright.
_ORIENTATION_TRANSPOSE = {
    2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90",
}


def _upright(img):
    """``img`` turned upright by its EXIF orientation (a new image; ``img`` is not changed).

    ``ImageOps.exif_transpose`` first; it rewrites the EXIF block, which fails on EXIF
    that Pillow reads but cannot write back (a tag whose type does not match its id, say):
    then the transposition is applied from the orientation tag alone."""
    Image = _pil()
    from PIL import ImageOps

    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # EXIF Pillow cannot parse: no orientation to apply
        return img
    method = _ORIENTATION_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    if method is None:
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img.transpose(getattr(getattr(Image, "Transpose", Image), method))  # Pillow < 9.1: Image.ROTATE_90, ...


def load_image(item):
    """Read one image as an RGB PIL image with its EXIF orientation applied.

    ``item``: a path, a binary file object, encoded bytes (``bytes``, ``bytearray`` or
    ``memoryview``), a PIL image or a uint8/uint16 array. Raises
    FileNotFoundError for a missing file and ValueError for anything that is not a readable,
    non-empty image (one over ``PIL.Image.MAX_IMAGE_PIXELS``, Pillow's guard against
    decompression bombs, included: the message says how to raise the limit).
    """
    Image = _pil()

    if isinstance(item, np.ndarray):
        return _array_to_pil(item)
    if isinstance(item, Image.Image):
        img = item
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"truncated or corrupt image ({e})") from e
    elif isinstance(item, (str, os.PathLike)) or hasattr(item, "read"):
        img = _open(item)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        img = _open(io.BytesIO(item))
    else:
        raise ValueError(f"cannot read an image from a {type(item).__name__}; pass a path, a PIL image or a uint8 array")
    if img.width == 0 or img.height == 0:
        raise ValueError(f"zero-size image ({img.width} x {img.height})")
    return to_rgb(_upright(img))


def as_image_list(images) -> List:
    """``images`` as a list of single images: a 4-D array counts as N images, a 1-D array of
    str or object dtype (``df.path.values``) as a sequence of paths; a path, encoded bytes
    (``bytes``, ``bytearray``, ``memoryview``), a file object, a PIL image or a 2-D/3-D array is
    one image."""
    Image = _pil()
    if isinstance(images, (str, os.PathLike, Image.Image, bytes, bytearray, memoryview)) or hasattr(images, "read"):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)
        if images.ndim == 1 and images.dtype.kind in "UO":  # paths (np.str_ as plain str)
            return [str(x) if isinstance(x, np.str_) else x for x in images.tolist()]
        return [images]
    if isinstance(images, Iterable):
        return list(images)
    raise ValueError(f"images must be paths, PIL images or arrays, or a list of them; got {type(images).__name__}")


def _image_index(i, n: int) -> int:
    """Index ``i`` of one of ``n`` images as an int in 0..n-1: an int (numpy ints too, bools
    not) in -n..n-1, negative ones counting from the end as in a list; TypeError / IndexError
    naming it and the valid range otherwise (the results' picture methods)."""
    if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
        raise TypeError(f"the image index i must be an int in 0..{n - 1} (or -{n}..-1 from the end), "
                        f"got {i!r} of type {type(i).__name__}")
    if not -n <= i < n:
        raise IndexError(f"image index i={i} out of range: this result has {n} image{'s' if n != 1 else ''}, "
                         f"pass 0..{n - 1} (or -{n}..-1 from the end)")
    return int(i) % n


#: file name endings (lower case) taken as images when a folder is listed
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class NoImagesFound(FileNotFoundError, ValueError):
    """A folder holds no image files (an OSError for the command line, a ValueError for
    callers that catch bad input)."""


def _expand_images(paths: Sequence) -> List[str]:
    """Paths (str or os.PathLike) as image file paths (str): a folder stands for its image
    files (``IMAGE_SUFFIXES``, any case), sorted by name; a file is kept as it is.
    FileNotFoundError for a missing path, ``NoImagesFound`` for a folder without images,
    ValueError when nothing is given."""
    out: List[str] = []
    for p in paths:
        p = os.fsdecode(p)
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p)
                           if f.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(p, f)))
            if not found:
                raise NoImagesFound(f"folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        elif not os.path.exists(p):
            raise FileNotFoundError(f"no such image file or folder: {p}")
        else:
            out.append(p)
    if not out:
        raise ValueError("no images given")
    return out


def _load_indexed(i: int, item):
    """load_image, its errors naming the image by index and path: FileNotFoundError for a
    missing file, ValueError for any other failure to read the image (the original error
    chained), MemoryError as it is."""
    try:
        return load_image(item)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image {i} ({_describe(item)}): {e}") from e
    except ValueError as e:
        raise ValueError(f"image {i} ({_describe(item)}): {e}") from e
    except MemoryError:
        raise
    except Exception as e:  # whatever Pillow or a file object raised
        raise ValueError(f"image {i} ({_describe(item)}): cannot read it ({type(e).__name__}: {e})") from e


_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()


def _after_fork_in_child() -> None:  # the parent's lock may have been held at the fork
    global _POOLS_LOCK
    _POOLS_LOCK = threading.Lock()
    _POOLS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def default_workers() -> int:
    """Threads that read and resize images: ``$DFFKIT_IO_THREADS``, else the cores this
    process may use (its CPU affinity: a container limited to 2 cores gets 2, not the host's
    count), at most 8. Pillow releases the GIL while it decodes and resizes, so they run in
    parallel."""
    env = os.environ.get("DFFKIT_IO_THREADS", "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"DFFKIT_IO_THREADS must be a positive integer, got {env!r}") from None
        if value < 1:
            raise ValueError(f"DFFKIT_IO_THREADS must be a positive integer, got {env!r}")
        return value
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform (macOS, Windows)
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _check_workers(workers) -> int:
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive int (1: no threads) or None, got {workers!r}")
    return int(workers)


def _pool(workers: int):
    """A process-wide thread pool of ``workers`` threads, made once per size and process (a
    forked child, e.g. a data-loader worker, gets its own: the parent's threads are not in it)."""
    key = (os.getpid(), workers)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="dffkit-io")
        return pool


def _thread_safe_workers(items: Sequence, workers: int) -> int:
    """``workers``, or 1 when one PIL image or file object appears twice: two threads must not
    decode (or read) the same object at once."""
    if workers == 1:
        return 1
    seen = set()
    for item in items:
        if isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)):
            continue
        if id(item) in seen:
            return 1
        seen.add(id(item))
    return workers


def _ordered(fn, jobs, workers: int) -> list:
    """[fn(*job) for job in jobs], on ``workers`` threads; the first failure in job order is
    raised, as the loop would raise it."""
    if workers == 1 or len(jobs) < 2:
        return [fn(*job) for job in jobs]
    futures = [_pool(workers).submit(fn, *job) for job in jobs]
    try:
        return [f.result() for f in futures]
    finally:
        for f in futures:
            f.cancel()


def load_images(images, *, start: int = 0, workers: Optional[int] = None) -> list:
    """Read images as RGB PIL images (EXIF orientation applied, any mode converted).

    Parameters
    ----------
    images : path, file object, PIL image, array, or a sequence of them
        A 4-D array (N, H, W, C) counts as N images.
    start : int
        Index of the first image in the caller's batch, used in error messages.
    workers : int, optional
        Threads that decode (default ``default_workers()``; 1: none). The result and the
        error raised (the first bad image in order) do not depend on it.

    Returns
    -------
    list of PIL.Image.Image in mode RGB; ``image_sizes`` gives their (H, W).

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the image by its index in the batch and its path.
    """
    items = as_image_list(images)
    workers = _thread_safe_workers(items, _check_workers(workers))
    if _all_in_memory(items):  # nothing to decode: handing each image to a thread costs more
        workers = 1
    return _ordered(_load_indexed, [(i, item) for i, item in enumerate(items, start)], workers)


def _all_in_memory(items: Sequence) -> bool:
    """Whether every item is a PIL image with no file behind it still to be read (made in memory
    or already loaded: ``fp`` None), whose loading is a check of its orientation and mode. 256
    such images took 3.9 ms on threads against 0.7 ms in a loop on 2 cores. Arrays are not: Pillow
    unpacks each RGB pixel into four bytes without the GIL, and 256 arrays of 224 x 224 took 41 ms
    on 2 threads against 68 in a loop (session 20, 2 cores)."""
    Image = _pil()
    return all(isinstance(item, Image.Image) and getattr(item, "fp", None) is None for item in items)


def _load_resized(i: int, item, size, resize: str):
    """(original (H, W) after EXIF orientation, resized uint8 (H', W', 3)) of one image."""
    if _at_size(item, size, resize):  # the pixels as they are (what Pillow would give back)
        return item.shape[:2], item
    img = _load_indexed(i, item)
    return (img.height, img.width), np.asarray(resize_image(img, size, resize), dtype=np.uint8)


def _is_rgb_array(item) -> bool:
    """Whether ``item`` is a non-empty (H, W, 3) uint8 array (an image in memory that Pillow
    would read as it is)."""
    return (isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 3
            and item.shape[2] == 3 and 0 not in item.shape)


def _at_size(item, size, resize: str) -> bool:
    """Whether ``item`` is an RGB uint8 array already at the size asked for (False for a bad
    size: the resize raises it)."""
    try:
        return _is_rgb_array(item) and tuple(resized_size(item.shape[:2], size, resize)) == item.shape[:2]
    except ValueError:
        return False


def _prepared(items: Sequence, size, resize: str) -> bool:
    """Whether every item is ``_at_size``: its preparation is a copy into the batch, which costs
    less than handing it to a thread (256 arrays of 224 x 224: 21-24 ms in a loop against 85
    through Pillow on threads, session 20, 2 cores). PIL images keep the threads as before
    (their conversion was not timed apart)."""
    return all(_at_size(item, size, resize) for item in items)


def resized_batches(items: Sequence, batch_size: int, size=224, resize: str = "fixed", *, workers: Optional[int] = None):
    """For each run of ``batch_size`` items: (their original (H, W) sizes, their resized
    uint8 pixels as a list of (H', W', 3) arrays). Read, oriented, converted and resized on
    ``workers`` threads; the next batch is under way while the caller uses this one (the
    onnxruntime run of a batch overlaps the decoding of the next)."""
    workers = _thread_safe_workers(items, _check_workers(workers))
    if len(items) < 2 or _prepared(items, size, resize):  # no hand-over to a thread (latency)
        workers = 1
    starts = list(range(0, len(items), batch_size))

    def jobs(start):
        return [(i, items[i], size, resize) for i in range(start, min(start + batch_size, len(items)))]

    if workers == 1:
        for start in starts:
            done = [_load_resized(*job) for job in jobs(start)]
            yield [d[0] for d in done], [d[1] for d in done]
        return
    pool = _pool(workers)
    current: list = []
    pending = [pool.submit(_load_resized, *job) for job in jobs(starts[0])] if starts else []
    try:
        for b in range(len(starts)):
            current = pending
            pending = [pool.submit(_load_resized, *job) for job in jobs(starts[b + 1])] if b + 1 < len(starts) else []
            done = [f.result() for f in current]
            yield [d[0] for d in done], [d[1] for d in done]
    finally:  # an error, or the caller stopped early: drop the work not started
        for f in current + pending:
            f.cancel()


def _different_sizes_advice(size, resize: str, size_name: str = "size", alternative: str = "") -> str:
    """Why resized images differ in size and how to make them one size (``size_name``: the
    caller's name for the size parameter; ``alternative``: what else the caller offers)."""
    if size is None:
        why = f"{size_name}=None keeps each image's own size"
        fix = f"pass an int {size_name} (e.g. {size_name}=224) to resize every image to one size"
    elif resize == "shorter":
        why = "resize='shorter' keeps each image's aspect ratio"
        fix = f"pass resize='fixed' to resize every image to {size_name}={size!r}"
    else:
        why, fix = f"resize={resize!r}, {size_name}={size!r}", f"pass one {size_name} for all"
    return f"{why}: {fix}" + (f", or {alternative}" if alternative else "")


def stack_resized(arrays: Sequence[np.ndarray], size=224, resize: str = "fixed", *, size_name: str = "size",
                  alternative: str = "process them one by one") -> np.ndarray:
    """Resized uint8 images -> one (N, H, W, 3) array; ValueError when they differ in size,
    saying how to make them one size (``size_name``: the caller's name for ``size``;
    ``alternative``: the caller's way to handle several sizes)."""
    shapes = {a.shape[:2] for a in arrays}
    if len(shapes) > 1:
        listed = sorted(shapes)
        shown = ", ".join(f"{h} x {w}" for h, w in listed[:4]) + (", ..." if len(listed) > 4 else "")
        raise ValueError(
            f"images come out in {len(shapes)} different sizes ({shown}) and cannot go into one batch; "
            + _different_sizes_advice(size, resize, size_name, alternative)
        )
    return np.stack(arrays)


def image_sizes(pil_images: Sequence) -> List[Tuple[int, int]]:
    """(H, W) of each PIL image."""
    return [(im.height, im.width) for im in pil_images]


def _pair(size) -> Tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    try:
        h, w = size
    except (TypeError, ValueError):
        raise ValueError(f"size must be an int or a (height, width) pair, got {size!r}") from None
    return int(h), int(w)


def resized_size(hw: Tuple[int, int], size, resize: str = "fixed") -> Tuple[int, int]:
    """Output (H, W) for an image of size ``hw``.

    ``resize="fixed"``: ``size`` (int or (H, W)). ``resize="shorter"``: the shorter side
    becomes ``size`` (an int) and the longer one keeps the aspect ratio, truncated to an int
    as torchvision's ``Resize(size)`` does. ``size=None`` keeps the image's size.
    """
    if size is None:
        return tuple(hw)
    if resize == "fixed":
        out = _pair(size)
    elif resize == "shorter":
        if not isinstance(size, (int, np.integer)):
            raise ValueError(f"resize='shorter' needs an int image_size (the shorter side), got {size!r}")
        h, w = hw
        s = int(size)
        out = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
    else:
        raise ValueError(f"resize must be 'fixed' or 'shorter', got {resize!r}")
    if min(out) < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    return out


def resize_image(img, size, resize: str = "fixed"):
    """Resize an RGB PIL image (bilinear, antialiased when shrinking, as torchvision does)."""
    Image = _pil()
    h, w = resized_size((img.height, img.width), size, resize)
    if (h, w) == (img.height, img.width):
        return img
    return img.resize((w, h), Image.BILINEAR)


def normalize(batch_uint8: np.ndarray, normalization: str = "imagenet") -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32.

    ``imagenet``: (x / 255 - mean) / std with ImageNet's mean and std (torchvision,
    the ONNX model zoo); ``caffe``: BGR order, 0..255 minus the Caffe mean (Keras VGG16);
    ``unit``: x / 255; ``none``: x as float.
    """
    x = np.asarray(batch_uint8, dtype=np.float32).transpose(0, 3, 1, 2)
    if normalization == "imagenet":
        scale = (1.0 / (255.0 * IMAGENET_STD)).reshape(1, 3, 1, 1)
        shift = (IMAGENET_MEAN / IMAGENET_STD).reshape(1, 3, 1, 1)
        out = x * scale - shift
    elif normalization == "caffe":
        out = x[:, ::-1] - CAFFE_MEAN_BGR.reshape(1, 3, 1, 1)
    elif normalization == "unit":
        out = x * np.float32(1.0 / 255.0)
    elif normalization == "none":
        out = x
    else:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    return np.ascontiguousarray(out, dtype=np.float32)


def preprocess(pil_images: Sequence, size=224, resize: str = "fixed", normalization: str = "imagenet") -> np.ndarray:
    """Resize and normalise RGB PIL images into one float32 array (N, 3, H, W).

    All images must come out the same size: with ``resize="shorter"`` or ``size=None``
    images of different shapes raise ValueError (run them one by one, or use
    ``FeatureExtractor.extract_list``).
    """
    return normalize(resize_batch(pil_images, size, resize), normalization)


def resize_batch(pil_images: Sequence, size=224, resize: str = "fixed", *, size_name: str = "size",
                 alternative: str = "process them one by one") -> np.ndarray:
    """Resize RGB PIL images into one uint8 array (N, H, W, 3): ``preprocess`` before its
    normalisation (``FeatureExtractor`` sends this to the model, which normalises it).
    Images that come out in different sizes raise ValueError, as in ``preprocess``
    (``size_name``, ``alternative``: see ``stack_resized``)."""
    if len(pil_images) == 0:
        raise ValueError("no images given")
    resized = [np.asarray(resize_image(to_rgb(im), size, resize), dtype=np.uint8) for im in pil_images]
    return stack_resized(resized, size, resize, size_name=size_name, alternative=alternative)
