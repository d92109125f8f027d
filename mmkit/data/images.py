"""Load any image a student may throw at mmkit, or say exactly why it cannot be used.

Every vision encoder in mmkit wants the same thing: an 8-bit RGB ``PIL.Image``.
Real data is messier than that, so ``load_image`` turns

    path / str / bytes / numpy array / PIL image  ->  PIL.Image.Image (mode "RGB")

handling the modes real datasets contain:

* grayscale ("L", "1")          -> the gray value copied into R, G and B
* transparency ("RGBA", "LA", "P" with a transparent colour)
                                -> composited on a white background (what a person
                                   sees in a browser; black would hide dark shapes)
* palette ("P")                 -> expanded to its colours
* CMYK (print JPEGs)            -> converted to RGB
* 16-bit / 32-bit ("I;16", "I", "F", e.g. scientific PNGs)
                                -> rescaled to 0..255, not clipped (clipping turns
                                   almost every 16-bit pixel white)

and it refuses, *before any compute is spent*, with an ``ImageError`` that names the
file, where it came from (``where="data.jsonl line 12, record 'abc'"``) and how to
fix it:

* the file does not exist, or is a folder
* the file is not an image (a text file, an HTML error page saved as .jpg, ...)
* the file is corrupt or truncated: the pixels are decoded in full with ``img.load()``
  so a half-downloaded JPEG fails here and not in the middle of an epoch.
  PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False on purpose: setting it to
  True silently fills the missing part with grey and the model trains on it.
* the image is huge ("decompression bomb"): the size is read from the header and
  checked before the pixels are decoded, so a 10000x10000 PNG is rejected in
  milliseconds instead of allocating 300 MB.
* the image is smaller than ``min_size`` pixels on a side (a 1x1 tracking pixel).

EXIF orientation is *not* applied (the same choice as LLaVA's loaders): box
annotations in datasets refer to the stored pixel grid.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

__all__ = ["ImageError", "load_image", "image_summary", "to_rgb", "DEFAULT_MAX_PIXELS"]

# 40 megapixels: larger than any photo a phone takes (~12-50 MP sits around here),
# far larger than any encoder input (224..1024 px), small enough that one decoded
# RGB image stays under 120 MB.
DEFAULT_MAX_PIXELS = 40_000_000

ImageSource = Union[str, Path, "Image.Image", bytes, bytearray, np.ndarray]


class ImageError(ValueError):
    """An image that cannot be used, with what is wrong and how to fix it.

    Attributes: ``source`` (the file name or a description of the object),
    ``where`` (e.g. "data.jsonl line 12, record 'abc'"), ``problem``, ``fix``.
    """

    def __init__(self, source: str, problem: str, fix: str, where: str = ""):
        self.source, self.problem, self.fix, self.where = source, problem, fix, where
        loc = f" ({where})" if where else ""
        super().__init__(f"Cannot use image {source}{loc}: {problem}\n  How to fix: {fix}")


# --------------------------------------------------------------------------- helpers


def _describe(src: Any) -> str:
    if isinstance(src, (str, Path)):
        return repr(str(src))
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        name = getattr(src, "filename", "") or ""
        return repr(name) if name else f"<PIL image {src.mode} {src.width}x{src.height}>"
    if isinstance(src, np.ndarray):
        return f"<array {src.dtype} {tuple(src.shape)}>"
    return f"<{type(src).__name__}>"


def _check_size(w: int, h: int, *, name: str, where: str, max_pixels: int, min_size: int) -> None:
    if w * h > max_pixels:
        # Suggest a size that fits, keeping the aspect ratio.
        scale = (max_pixels / (w * h)) ** 0.5
        nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
        raise ImageError(
            name,
            f"the image is {w}x{h} = {w * h:,} pixels, above the limit of max_pixels="
            f"{max_pixels:,} (a guard against decompression bombs; it was not decoded).",
            f"resize it first, e.g. `PIL.Image.open(path).resize(({nw}, {nh})).save(path)` "
            f"or `mogrify -resize {nw}x{nh} FILE`; or, if you trust the file, pass a larger "
            f"max_pixels= to load_image.",
            where,
        )
    if w < min_size or h < min_size:
        raise ImageError(
            name,
            f"the image is only {w}x{h} pixels; at least {min_size}x{min_size} is needed "
            "(1x1 images are usually tracking pixels or failed downloads).",
            "remove this record from the data or replace the file with the real image.",
            where,
        )


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Map an integer/float array of any range to uint8, without clipping."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float64))
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        if lo >= 0.0 and hi <= 1.0:  # the usual float convention: [0, 1]
            return np.round(a * 255.0).astype(np.uint8)
        if lo >= 0.0 and hi <= 255.0:
            return np.round(a).astype(np.uint8)
        span = (hi - lo) or 1.0
        return np.round((a - lo) / span * 255.0).astype(np.uint8)
    # integers
    a = a.astype(np.int64)
    lo, hi = int(a.min(initial=0)), int(a.max(initial=0))
    if lo >= 0 and hi <= 255:
        return a.astype(np.uint8)
    if lo >= 0 and hi <= 65535:  # 16-bit data: 65535 -> 255
        return (a // 257).astype(np.uint8)
    span = (hi - lo) or 1
    return ((a - lo) * 255 // span).astype(np.uint8)


def _composite(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (see the module docstring for the rules).

    Transparent pixels are composited onto ``background``: white by default (what a
    person sees in a browser); ``VisionEncoder.preprocess`` passes the encoder's mean
    colour, so they normalise to ~0 like its letterbox padding.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite(img, background)
    if mode == "P":
        if "transparency" in img.info:
            return _composite(img.convert("RGBA"), background)
        return img.convert("RGB")
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float gray
        gray = _scale_to_uint8(np.asarray(img))
        return Image.fromarray(gray, mode="L").convert("RGB")
    # "1", "L", "CMYK", "YCbCr", "LAB", "HSV", "RGBX": PIL knows the conversion.
    return img.convert("RGB")


def _array_to_image(a: np.ndarray, name: str, where: str) -> Image.Image:
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.transpose(a, (1, 2, 0))  # (C, H, W) -> (H, W, C), torchvision layout
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageError(
            name,
            f"an array of shape {tuple(a.shape)} is not an image.",
            "pass (H, W) for gray, (H, W, 3) for RGB or (H, W, 4) for RGBA "
            "(channels-first (3, H, W) is also accepted).",
            where,
        )
    a = _scale_to_uint8(a)
    return Image.fromarray(np.ascontiguousarray(a), mode={2: "L", 3: "RGB", 4: "RGBA"}[
        2 if a.ndim == 2 else a.shape[-1]
    ])


# --------------------------------------------------------------------------- API


def load_image(
    src: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = 2,
    where: str = "",
) -> Image.Image:
    """Open ``src`` and return an 8-bit RGB ``PIL.Image.Image``, fully decoded.

    Args:
        src: a path (str or Path), the encoded bytes of a file, a numpy array
            ((H, W), (H, W, 3), (H, W, 4) or channels-first; uint8, 16-bit or float
            in [0, 1]) or a PIL image (any mode).
        max_pixels: refuse images with more pixels than this (checked from the
            header, before decoding).
        min_size: refuse images narrower or shorter than this.
        where: where the image was referenced, for the error message, e.g.
            ``"data.jsonl line 12, record 'abc'"``.

    Raises:
        ImageError: missing file, not an image, corrupt/truncated, too large, too small.
    """
    name = _describe(src)

    if isinstance(src, Image.Image):
        img = src
        _check_size(img.width, img.height, name=name, where=where,
                    max_pixels=max_pixels, min_size=min_size)
        try:
            img.load()  # a lazily opened image may still be truncated
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
            raise _corrupt(name, e, where) from e
        return to_rgb(img)

    if isinstance(src, np.ndarray) or (hasattr(src, "__array__") and not isinstance(src, (str, Path, bytes, bytearray))):
        img = _array_to_image(np.asarray(src), name, where)
        _check_size(img.width, img.height, name=name, where=where,
                    max_pixels=max_pixels, min_size=min_size)
        return to_rgb(img)

    if isinstance(src, (bytes, bytearray)):
        if len(src) == 0:
            raise ImageError(name, "the data is empty (0 bytes).",
                             "check the download or the dataset column that produced it.", where)
        return _open_and_decode(io.BytesIO(src), name, where, max_pixels, min_size)

    if isinstance(src, (str, Path)):
        path = Path(src).expanduser()
        if str(src).startswith(("http://", "https://")):
            raise ImageError(
                name, "URLs are not downloaded by mmkit (everything runs offline).",
                "download the images into a folder and refer to them by relative path "
                "(with image_folder=...).", where)
        if not path.exists():
            hint = ""
            parent = path.parent
            if parent.is_dir():
                similar = sorted(p.name for p in parent.iterdir() if p.stem == path.stem)[:3]
                if similar:
                    hint = f" Files with the same name but another extension exist: {similar}."
            raise ImageError(
                name, f"file not found (resolved to {str(path.resolve())!r}).{hint}",
                "check the path and the image_folder it is relative to; the current folder "
                f"is {str(Path.cwd())!r}.", where)
        if path.is_dir():
            raise ImageError(name, "this is a folder, not an image file.",
                             "point to an image file inside it.", where)
        if path.stat().st_size == 0:
            raise ImageError(name, "the file is empty (0 bytes), probably a failed download.",
                             "download or copy the image again, or drop the record.", where)
        with open(path, "rb") as f:
            return _open_and_decode(f, name, where, max_pixels, min_size)

    raise ImageError(
        name, f"cannot load an image from a {type(src).__name__}.",
        "pass a path, bytes, a numpy array or a PIL.Image.Image.", where)


def _corrupt(name: str, e: BaseException, where: str) -> ImageError:
    msg = str(e) or type(e).__name__
    truncated = "truncated" in msg.lower()
    return ImageError(
        name,
        ("the file is truncated (the end of the pixel data is missing: " + msg + ").")
        if truncated else f"the file is corrupt and could not be decoded ({type(e).__name__}: {msg}).",
        "re-download or re-export the image (e.g. open and save it again in an image "
        "editor), or remove the record. Do not set PIL's LOAD_TRUNCATED_IMAGES=True: "
        "the model would train on grey filler.",
        where,
    )


# File signatures, to tell "corrupt image" from "not an image at all".
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"),
          (b"RIFF", "WebP"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def _open_and_decode(fp, name: str, where: str, max_pixels: int, min_size: int) -> Image.Image:
    with warnings.catch_warnings():
        # Our own max_pixels check replaces PIL's DecompressionBombWarning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)  # reads the header only
        except Image.DecompressionBombError as e:
            raise ImageError(
                name, f"PIL refused to open it as a decompression bomb ({e}).",
                "resize the image to fewer pixels before using it.", where) from e
        except Image.UnidentifiedImageError as e:
            head = b""
            try:
                fp.seek(0)
                head = fp.read(64)
            except Exception:  # noqa: BLE001
                pass
            looks = ""
            text = head.lstrip().lower()
            kind = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
            if kind and not (kind == "WebP" and head[8:12] != b"WEBP"):
                raise ImageError(
                    name, f"the file starts like a {kind} but its header is corrupt, so it "
                    "cannot be decoded.",
                    "re-download or re-export the image, or remove the record.", where) from e
            if text.startswith((b"<!doctype html", b"<html")):
                looks = " It looks like an HTML page (a failed download saved under an image name)."
            elif text[:1] in (b"{", b"["):
                looks = " It looks like JSON text."
            elif head and all(32 <= c < 127 or c in (9, 10, 13) for c in head):
                looks = " It looks like a text file."
            raise ImageError(
                name, f"not an image file that PIL can read.{looks}",
                "check that the path points to a JPEG/PNG/WebP/... file; re-download it if the "
                "download failed.", where) from e
        except (OSError, SyntaxError, ValueError) as e:
            raise _corrupt(name, e, where) from e

        with img:
            _check_size(img.width, img.height, name=name, where=where,
                        max_pixels=max_pixels, min_size=min_size)
            try:
                img.load()  # force the full decode: truncated / corrupt data fails *here*
            except Exception as e:  # noqa: BLE001 - OSError mostly, sometimes SyntaxError/ValueError
                raise _corrupt(name, e, where) from e
            out = to_rgb(img)
            if out is img:
                out = img.copy()  # detach from the file handle we are about to close
            return out


def image_summary(img: Image.Image) -> str:
    """One line describing an image, e.g. ``"640x480 RGB (JPEG, from 'cat.jpg')"``."""
    parts = [f"{img.width}x{img.height} {img.mode}"]
    extra = []
    if getattr(img, "format", None):
        extra.append(img.format)
    if getattr(img, "filename", None):
        extra.append(f"from {Path(img.filename).name!r}")
    if "transparency" in getattr(img, "info", {}) or img.mode in ("RGBA", "LA", "PA"):
        extra.append("has transparency")
    nbytes = img.width * img.height * len(img.getbands())
    extra.append(f"{nbytes / 1e6:.1f} MB decoded" if nbytes >= 1e6
                 else f"{nbytes / 1e3:.1f} kB decoded" if nbytes >= 1e3 else f"{nbytes} B decoded")
    return parts[0] + (f" ({', '.join(extra)})" if extra else "")

