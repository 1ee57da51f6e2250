"""PS3.15 E.3.1 Clean Pixel Data: blank the regions where a device writes identifying text
into its pixels, in every frame and every sample, and record that it was done.

Which regions is the site's knowledge of its devices (:class:`~.options.PixelMask`): the
standard gives no way to find burned-in text from the header alone. The pixels are
decoded by pydicom (compressed ones with whatever decoder is installed) and written back
uncompressed, so the blanked values cannot survive in a lossy encoding's residue."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from tributary.spoke.deid.options import PixelMask

if TYPE_CHECKING:  # numpy loads with the first image cleaned, not with the engine
    import numpy as np


class PixelCleaningError(ValueError):
    """The pixels of a matched image could not be cleaned (undecodable, regions outside
    the image...); the image must then stay out."""


def clean_pixels(ds: Dataset, mask: PixelMask) -> int:
    """Blank ``mask``'s regions in ``ds`` in place; returns how many pixels per frame were
    blanked. Sets BurnedInAnnotation to NO: the known text is gone."""
    import numpy as np

    rows, columns = int(ds.Rows), int(ds.Columns)
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_little_endian or int(ds.BitsAllocated) not in (8, 16, 32, 64):
        raise PixelCleaningError(f"cannot clean pixels of {syntax.name} with "
                                 f"BitsAllocated {ds.BitsAllocated}")
    for x, y, width, height in mask.regions:
        if x >= columns or y >= rows:
            raise PixelCleaningError(f"region {(x, y, width, height)} lies outside the "
                                     f"{columns}x{rows} image")
    try:
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress(generate_instance_uid=False)
        pixels = np.array(pixel_array(ds, raw=True), copy=True)
    except Exception as exc:  # no decoder for this syntax, damaged data...
        raise PixelCleaningError(f"cannot decode the pixel data to clean it: "
                                 f"{type(exc).__name__}: {exc}"[:300]) from exc
    frames = int(ds.get("NumberOfFrames") or 1)
    view = pixels if frames > 1 else pixels[np.newaxis]  # (frames, rows, columns[, samples])
    fill = _black(ds, view)
    blanked = np.zeros((rows, columns), dtype=bool)
    for x, y, width, height in mask.regions:
        blanked[y:y + height, x:x + width] = True
    view[:, blanked] = fill
    ds.PixelData = pixels.tobytes()
    ds.BurnedInAnnotation = "NO"
    return int(blanked.sum())


def _black(ds: Dataset, pixels: np.ndarray) -> int | float:
    """What shows as black: the lowest value, or the highest under MONOCHROME1."""
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        return pixels.max() if pixels.size else 0
    if int(ds.get("SamplesPerPixel") or 1) > 1:
        return 0
    return pixels.min() if pixels.size else 0
