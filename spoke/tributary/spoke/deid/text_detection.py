"""Find text burned into pixel data with OCR, on the kinds of image where devices and
people put it: secondary captures, ultrasound, screenshots, dose reports, scanned documents.

A site's pixel masks (:class:`~.options.PixelMask`) only cover device layouts it knows;
any other image with a name in its pixels would pass unless its header declared it. The
header cannot be trusted to say so, so the pixels themselves are read with Tesseract
(Debian's ``tesseract-ocr``, through ``pytesseract``, which runs the ``tesseract`` program
and so needs no compiled binding tied to one libtesseract version). What it finds is
reported with its regions; screening then excludes the image or, under Clean Pixel Data,
blanks the regions.

OCR is a screen, not a proof: text it cannot read (tiny, rotated, low contrast) is missed,
which is why images declaring burned-in annotation stay out unless a mask covers them."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
from pydicom.uid import UID

if TYPE_CHECKING:  # numpy, Pillow and pytesseract load with the first image read for text
    import numpy as np

TextScope = Literal["off", "text-prone", "all"]

#: Modalities whose images commonly carry burned-in text (PS3.3 C.7.3.1.1.1).
TEXT_PRONE_MODALITIES = frozenset({"US", "OT", "SC", "XC", "ES", "GM", "DOC", "SR", "KO"})
#: Words in a series or study description that name a screenshot, a report or a form.
_TEXT_PRONE_WORDS = re.compile(r"\b(DOSE|REPORT|SCREEN|SUMMARY|PROTOCOL|FORM|SCAN(NED)? "
                               r"DOC|WORKSHEET|CAPTURE)", re.IGNORECASE)
#: A word counts as text when Tesseract is at least this confident (0-100) and it has at
#: least this many letters or digits. Noise and anatomy read as short, unsure "words", so
#: a short word must be read with confidence; a long one may be less sure (a DICOM name
#: such as ``SMITH^JOHN`` in a small font reads at 30 to 50).
ACCEPT = ((60.0, 2), (40.0, 4), (20.0, 6))
#: Frames read of a multi-frame image: first, middle, last (overlays are static in cine).
_FRAMES = 3
#: Pixels of margin added around each word, so that blanking covers glyph edges.
_MARGIN = 2
#: Tesseract reads glyphs best around 20-40 px high; small images are enlarged.
_MIN_SIDE = 600
#: Seconds one frame may take; a pathological image must not stall an ingest worker.
_TIMEOUT = 120


class TextDetectionError(RuntimeError):
    """The pixels could not be read for text (undecodable, or no OCR engine): the image
    cannot be shown to be free of text and must stay out."""


class TextRegion(BaseModel):
    """A line of text found in the pixels, as (x, y, width, height) from the top left
    corner; ``confidence`` is the least sure of its words."""

    model_config = ConfigDict(frozen=True)

    x: int
    y: int
    width: int
    height: int
    #: How many characters were read there (the text itself is never kept: it may be a
    #: name, and the report is read by people who must not see it).
    characters: int
    confidence: float

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.width, self.height


def text_prone(ds: Dataset) -> bool:
    """Whether ``ds`` is a kind of image that commonly carries burned-in text."""
    sop_class = UID(str(ds.get("SOPClassUID", "")))
    name = sop_class.name if sop_class.is_valid else ""
    if any(kind in name for kind in ("Secondary Capture", "Ultrasound", "Video",
                                     "Encapsulated", "Dose")):
        return True
    if str(ds.get("Modality", "")).strip().upper() in TEXT_PRONE_MODALITIES:
        return True
    image_type = ds.get("ImageType") or []
    values = list(image_type) if isinstance(image_type, (list, tuple, MultiValue)) \
        else [image_type]
    if any(str(v).strip().upper() in ("SCREEN SAVE", "SECONDARY") for v in values):
        return True
    described = f"{ds.get('SeriesDescription', '')} {ds.get('StudyDescription', '')}"
    return bool(_TEXT_PRONE_WORDS.search(described))


def should_scan(ds: Dataset, scope: TextScope) -> bool:
    return scope == "all" or (scope == "text-prone" and text_prone(ds))


def detect_text(ds: Dataset) -> list[TextRegion]:
    """The words Tesseract reads in ``ds``'s pixels (a few frames of a multi-frame image),
    in image coordinates. Raises :class:`TextDetectionError` if it cannot look."""
    import numpy as np

    photometric = str(ds.get("PhotometricInterpretation", ""))
    regions: dict[tuple[int, int, int, int], TextRegion] = {}
    try:
        frames = max(1, int(ds.get("NumberOfFrames") or 1))
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (TypeError, ValueError) as exc:
        raise TextDetectionError(f"NumberOfFrames or SamplesPerPixel unreadable: "
                                 f"{exc}"[:300]) from exc
    for index in sorted({0, (frames - 1) // 2, frames - 1})[:_FRAMES]:
        try:  # only the frames read are decoded: a long cine loop stays small in memory
            frame = np.asarray(pixel_array(ds, index=index if frames > 1 else None))
        except Exception as exc:  # no decoder for this syntax, damaged data...
            raise TextDetectionError(f"cannot decode the pixel data to look for text: "
                                     f"{type(exc).__name__}: {exc}"[:300]) from exc
        try:
            image = _grey8(frame, samples, photometric)
        except Exception as exc:  # a shape or type no picture has: hostile or damaged
            raise TextDetectionError(f"cannot turn the pixel data into a picture: "
                                     f"{type(exc).__name__}: {exc}"[:300]) from exc
        for region in _words(image):
            regions.setdefault(region.box, region)
    return sorted(regions.values(), key=lambda r: (r.y, r.x))


def _grey8(frame: np.ndarray, samples: int, photometric: str) -> np.ndarray:
    """One frame as 8-bit grey, stretched to the full range so faint text still reads."""
    import numpy as np

    data = frame.astype(np.float64)
    if samples > 1 and data.ndim == 3:
        data = data[..., :3] @ np.array([0.299, 0.587, 0.114])[: data.shape[-1]]
    if data.ndim != 2 or not np.isfinite(data).all():
        raise ValueError(f"a frame of shape {frame.shape} with {samples} sample(s) per pixel")
    low, high = float(data.min()), float(data.max())
    scaled = np.zeros(data.shape, dtype=np.uint8) if high <= low else \
        ((data - low) * (255.0 / (high - low))).astype(np.uint8)
    if photometric.strip() == "MONOCHROME1":
        scaled = 255 - scaled
    return scaled


def _words(grey: np.ndarray) -> list[TextRegion]:
    import pytesseract
    from PIL import Image

    rows, columns = grey.shape
    scale = max(1, -(-_MIN_SIDE // max(rows, columns)))  # ceil, at least 1
    image = Image.fromarray(grey)
    if scale > 1:
        image = image.resize((columns * scale, rows * scale), Image.Resampling.LANCZOS)
    try:
        data = pytesseract.image_to_data(image, config="--psm 11", timeout=_TIMEOUT,
                                         output_type=pytesseract.Output.DICT)
    except (pytesseract.TesseractNotFoundError, pytesseract.TesseractError, RuntimeError,
            OSError) as exc:  # RuntimeError: pytesseract's timeout
        raise TextDetectionError(f"OCR engine unavailable or failed: "
                                 f"{type(exc).__name__}: {exc}"[:300]) from exc
    words = []
    for text, conf, left, top, width, height in zip(
            data["text"], data["conf"], data["left"], data["top"], data["width"],
            data["height"], strict=True):
        word, confidence = str(text).strip(), float(conf)
        letters = sum(c.isalnum() for c in word)
        if not any(confidence >= least and letters >= chars for least, chars in ACCEPT):
            continue
        x, y = max(0, left // scale - _MARGIN), max(0, top // scale - _MARGIN)
        right = min(columns, -(-(left + width) // scale) + _MARGIN)
        bottom = min(rows, -(-(top + height) // scale) + _MARGIN)
        words.append(TextRegion(x=x, y=y, width=right - x, height=bottom - y,
                                characters=len(word), confidence=round(confidence, 1)))
    return _lines(words)


def _lines(words: list[TextRegion]) -> list[TextRegion]:
    """Words side by side on one line (overlapping rows, a gap under a few glyph heights)
    become one region, so the spaces between them, and any word Tesseract read too
    unsurely to keep, are blanked with them."""
    merged: list[TextRegion] = []
    for word in sorted(words, key=lambda w: (w.y, w.x)):
        for index, line in enumerate(merged):
            overlap = min(line.y + line.height, word.y + word.height) - max(line.y, word.y)
            gap = max(word.x - (line.x + line.width), line.x - (word.x + word.width))
            if overlap > 0.5 * min(line.height, word.height) and \
                    gap < 5 * max(line.height, word.height):
                x, y = min(line.x, word.x), min(line.y, word.y)
                merged[index] = TextRegion(
                    x=x, y=y, width=max(line.x + line.width, word.x + word.width) - x,
                    height=max(line.y + line.height, word.y + word.height) - y,
                    characters=line.characters + word.characters,
                    confidence=min(line.confidence, word.confidence))
                break
        else:
            merged.append(word)
    return merged
