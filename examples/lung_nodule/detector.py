"""Lung nodule candidate detector: a Tributary algorithm (contract v1).

A deliberately classical pipeline, so its behaviour can be reasoned about and verified on
synthetic cohorts with known ground truth:

1. load the CT series, sorted along the slice normal, converted to Hounsfield units;
2. segment the lungs: air (below ``threshold_hu``) connected components that do not touch
   the in-plane border of the volume (that air is outside the body), holes filled slice by
   slice so that anything enclosed by lung is inside the mask;
3. candidates are the dense voxels (at or above ``threshold_hu``) inside that mask, grouped
   into 3-D connected components;
4. components whose equivalent-sphere diameter is at least ``min_diameter_mm`` are reported
   with centre, diameter, volume and mean density, in patient coordinates (mm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from tributary_algorithm import Context, Series, UnsuitableInput, run

SCHEMA_PATH = Path(__file__).with_name("arguments.schema.json")
#: Air components smaller than this are pockets or noise, not a lung.
MIN_LUNG_VOLUME_MM3 = 20_000.0
#: Slices further apart than this fraction from the median spacing break the volume model.
SPACING_TOLERANCE = 0.1


@dataclass(frozen=True)
class Volume:
    """A CT volume in HU and the affine that maps (slice, row, column) to patient mm."""

    hu: np.ndarray  # (slices, rows, columns), float32
    origin: np.ndarray  # patient position of voxel (0, 0, 0)
    row_step: np.ndarray  # patient mm per +1 row index
    column_step: np.ndarray  # patient mm per +1 column index
    slice_step: np.ndarray  # patient mm per +1 slice index

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.dot(np.cross(self.column_step, self.row_step), self.slice_step)))

    def to_patient(self, index: np.ndarray) -> np.ndarray:
        """(slice, row, column) indices, possibly fractional, to patient (x, y, z) mm."""
        k, r, c = index
        return self.origin + k * self.slice_step + r * self.row_step + c * self.column_step


def load_volume(series: Series) -> Volume:
    """Read a CT series into a HU volume, sorted by position along the slice normal."""
    slices = [ds for ds in series.iter_datasets() if "PixelData" in ds]
    if len(slices) < 3:
        raise UnsuitableInput(f"series has {len(slices)} image(s); a volume needs at least 3")
    first = slices[0]
    try:
        orientation = np.array([float(v) for v in first.ImageOrientationPatient])
        row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
        shape = (int(first.Rows), int(first.Columns))
    except (AttributeError, TypeError, ValueError) as exc:
        raise UnsuitableInput(f"series lacks image geometry: {exc}") from exc
    along_row, along_column = orientation[:3], orientation[3:]
    normal = np.cross(along_row, along_column)
    positioned = []
    for ds in slices:
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise UnsuitableInput("slices of different sizes: not one volume")
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], orientation, atol=1e-4):
            raise UnsuitableInput("slices with different orientations: not one volume")
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        positioned.append((float(np.dot(position, normal)), position, ds))
    positioned.sort(key=lambda item: item[0])
    distances = np.diff([item[0] for item in positioned])
    spacing = float(np.median(distances))
    if spacing <= 0 or np.any(np.abs(distances - spacing) > SPACING_TOLERANCE * spacing):
        raise UnsuitableInput("slices are not evenly spaced (missing or duplicate slices)")
    hu = np.empty((len(positioned), *shape), dtype=np.float32)
    for k, (_, _, ds) in enumerate(positioned):
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        hu[k] = ds.pixel_array.astype(np.float32) * slope + intercept
    origin = positioned[0][1]
    slice_step = (positioned[-1][1] - origin) / (len(positioned) - 1)
    return Volume(
        hu=hu,
        origin=origin,
        row_step=along_column * row_spacing,
        column_step=along_row * column_spacing,
        slice_step=slice_step,
    )


def segment_lungs(hu: np.ndarray, threshold_hu: float, voxel_volume_mm3: float) -> np.ndarray:
    """Boolean mask of the lungs with everything they enclose (per-slice hole filling)."""
    air = hu < threshold_hu
    labels, count = ndimage.label(air)
    if count == 0:
        return np.zeros_like(air)
    outside = np.unique(
        np.concatenate(
            [
                labels[:, 0, :].ravel(),
                labels[:, -1, :].ravel(),
                labels[:, :, 0].ravel(),
                labels[:, :, -1].ravel(),
            ]
        )
    )
    sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(float) * voxel_volume_mm3
    keep = sizes >= MIN_LUNG_VOLUME_MM3
    keep[outside] = False
    keep[0] = False
    if not keep.any():
        raise UnsuitableInput(
            f"no lungs found: no enclosed air region of {MIN_LUNG_VOLUME_MM3 / 1000:g} ml or "
            f"more below {threshold_hu:g} HU (is this a chest CT?)"
        )
    lungs = keep[labels]
    for k in range(lungs.shape[0]):
        lungs[k] = ndimage.binary_fill_holes(lungs[k])
    return lungs


def find_candidates(
    volume: Volume, threshold_hu: float, min_diameter_mm: float
) -> list[dict[str, Any]]:
    """Dense components inside the lungs, largest first, in patient coordinates."""
    voxel_mm3 = volume.voxel_volume_mm3
    lungs = segment_lungs(volume.hu, threshold_hu, voxel_mm3)
    dense = lungs & (volume.hu >= threshold_hu)
    labels, count = ndimage.label(dense, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    voxels = ndimage.sum_labels(np.ones_like(labels), labels, index)
    centres = ndimage.center_of_mass(dense, labels, index)
    mean_hu = ndimage.mean(volume.hu, labels, index)
    findings = []
    for n, centre, density in zip(voxels, centres, mean_hu, strict=True):
        volume_mm3 = float(n) * voxel_mm3
        diameter = (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0)
        if diameter < min_diameter_mm:
            continue
        position = volume.to_patient(np.array(centre))
        findings.append(
            {
                "center_mm": [round(float(v), 2) for v in position],
                "diameter_mm": round(diameter, 2),
                "volume_mm3": round(volume_mm3, 1),
                "mean_hu": round(float(density), 1),
            }
        )
    findings.sort(key=lambda f: f["volume_mm3"], reverse=True)
    return findings


def main(ctx: Context) -> dict[str, Any]:
    """Entry point called by the SDK's ``run``: arguments checked, output returned."""
    arguments = ctx.validated_arguments(SCHEMA_PATH)
    ct = ctx.series_with_modality("CT")
    if not ct:
        modalities = sorted({s.modality for s in ctx.series}) or ["none"]
        raise UnsuitableInput(f"no CT series in this case (modalities: {', '.join(modalities)})")
    series = max(ct, key=lambda s: s.instance_count)  # the most complete CT series
    volume = load_volume(series)
    findings = find_candidates(
        volume, float(arguments["threshold_hu"]), float(arguments["min_diameter_mm"])
    )
    return {"nodule_count": len(findings), "findings": findings, "series_id": series.series_id}


if __name__ == "__main__":
    run(main)
