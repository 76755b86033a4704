"""DICOM out (synthetic Secondary Capture + Segmentation) and DICOM X-ray in.

Why this file is long: the reader and both writers share one set of rules (synthetic marking,
geometry, patient/study reuse, UIDs) that must stay consistent; they are kept side by side.

Geometry written into every Secondary Capture (and, through highdicom, the SEG):

* Frame of Reference UID (new per image), Position Reference Indicator empty;
* Image Position (Patient) ``0\\0\\0`` and Image Orientation (Patient)
  ``1\\0\\0\\0\\1\\0`` (identity in LPS);
* Pixel Spacing = Nominal Scanned Pixel Spacing = ``(row, column)`` spacing in mm;
* Patient Orientation ``L\\P``: the row direction (+x of the identity orientation)
  points to the patient's left and the column direction (+y) to posterior. This is
  what the identity orientation means in the patient coordinate system; we do not
  claim the anatomically true coronal ``L\\F`` because that would contradict the
  orientation written beside it;
* Modality ``OT`` (US/XA/RF/ES would send the SC to Slicer's image-sequence loader).

Why identity: Slicer's scalar-volume loader (GDCM) has historically ignored SC
orientation and put the image at origin 0 with identity direction, i.e. RAS
``ijkToRAS = diag(-sx, -sy, 1, 1)``; dcmqi reads the SEG's per-frame plane position
and orientation. Writing exactly that geometry makes both loaders and the Slicer
canvas (slicer-guide section 3) put SC and SEG on the same pixels, whichever way
the reader treats SC geometry. Image pixel (row r, column c) therefore sits at LPS
``(c * sx, r * sy, 0)``.

Provenance is recorded in the SC's Image Comments as ``XREAL-PROVENANCE <json>``
(the full ``provenance`` dict, JSON, sorted keys) and summarised in Derivation
Description; both are standard General Image module attributes, no private tags.
The SEG carries the same Image Comments, the model id as Device Serial Number and
the seed in Content Description, and references the SC.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sr.coding import Code

from .. import __version__
from ..errors import InputError
from .formats import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE
from ..vocabulary import anatomy_entry, attention_region_entry, finding_entry, numbered_name, removal_region_entry

MANUFACTURER = "XRealSlicer project"
MODEL_NAME = "xreal-engine"
SYNTHETIC_PATIENT_NAME = "Synthetic^XReal"
SC_SERIES_NUMBER = 901
SEG_SERIES_NUMBER = 902
PATIENT_ORIENTATION = ("L", "P")
PROVENANCE_PREFIX = "XREAL-PROVENANCE "

# Patient and General Study module attributes copied from the source in edit mode; nothing else is copied.
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)


@dataclass
class XRayImage:
    """A grayscale X-ray read from DICOM: display-ready pixels in [0, 1] (white = dense).

    ``pixel_spacing_mm`` is (row, column); ``spacing_from_file`` says whether the file recorded
    it or it was derived from the default field of view.
    """

    pixels: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    dataset: pydicom.Dataset = field(repr=False)
    spacing_from_file: bool = True


@dataclass
class SegmentSpec:
    """One SEG segment: a binary mask on the SC grid and exactly one of an anatomy label, a finding, ``removal``
    or ``attention``.

    ``removal`` marks an edit-mode region that was inpainted to remove a finding: it is one of the
    masks that produced the image, so it is recorded too, coded as an imaging region of interest.
    ``attention`` marks where the attention control's map is high (io/controls.py), coded as saliency.
    """

    mask: np.ndarray
    label: int | None = None
    finding: str | None = None
    removal: bool = False
    attention: bool = False

    @property
    def kind(self) -> str:
        """'anatomy', 'pathology', 'removed' or 'attention' (the ``kind`` in segments.json)."""
        if self.attention:
            return "attention"
        return "anatomy" if self.label is not None else "pathology" if self.finding is not None else "removed"

    def vocabulary_entry(self) -> dict:
        """Name, codes and colour of this segment from the vocabulary; InputError unless exactly one meaning is set."""
        if (self.label is not None) + (self.finding is not None) + bool(self.removal) + bool(self.attention) != 1:
            raise InputError("A segment must have exactly one of an anatomy label, a finding, the removal flag or "
                             "the attention flag.")
        if self.label is not None:
            return anatomy_entry(self.label)
        if self.attention:
            return attention_region_entry()
        return finding_entry(self.finding) if self.finding is not None else removal_region_entry()


# ---------------------------------------------------------------------------- input


def _voi_output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """Range of the values apply_voi_lut produces (PS3.3 C.11.2), used to map them to [0, 1]."""
    if "VOILUTSequence" in ds:  # apply_voi_lut prefers the LUT over a window
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.PixelRepresentation) == 0:
        low, high = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        low, high = float(-(2 ** (int(ds.BitsStored) - 1))), float(2 ** (int(ds.BitsStored) - 1) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    return low, high


def _spacing_from(ds: pydicom.Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            row, col = float(value[0]), float(value[1])
            if row > 0 and col > 0:
                return row, col
    return None


def _without_pixels(ds) -> str:
    """Why a DICOM without pixel data is no X-ray: a non-image object, or a corrupt or cut-off file."""
    sop_class = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    kind = str(getattr(sop_class, "name", "") or "")
    if not sop_class or not kind or kind == str(sop_class):
        return "the DICOM file is corrupt or cut off (no pixel data and no known SOP Class); give a DX, CR or SC X-ray."
    if "Image" in kind:
        return f"the DICOM file has no pixel data although it is a {kind} object: it is cut off or damaged."
    return f"the DICOM file is a {kind} object, not an image; give a DX, CR or SC X-ray."


# Transfer syntaxes whose compression may lose information, and the method's name for Lossy Image
# Compression Method (PS3.3 C.7.6.1.1.5). JPEG 2000 "Image Compression" may be either: lossy unless the file says not.
LOSSY_TRANSFER_SYNTAXES = {"1.2.840.10008.1.2.4.50": "ISO_10918_1", "1.2.840.10008.1.2.4.51": "ISO_10918_1",
                           "1.2.840.10008.1.2.4.81": "ISO_14495_1", "1.2.840.10008.1.2.4.91": "ISO_15444_1",
                           "1.2.840.10008.1.2.4.93": "ISO_15444_2", "1.2.840.10008.1.2.4.203": "ISO_15444_15"}


def _lossy_history(ds) -> dict:
    """Lossy Image Compression (and its ratio and method) of a source whose pixels were lossy-compressed, as
    the source says or its transfer syntax shows; {} if they were not. Once lossy, every derived image is."""
    said = str(ds.get("LossyImageCompression", "")).strip()
    if said == "01":
        return {keyword: ds[keyword].value for keyword in ("LossyImageCompression", "LossyImageCompressionRatio",
                                                           "LossyImageCompressionMethod") if keyword in ds}
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if syntax not in LOSSY_TRANSFER_SYNTAXES or (said == "00" and syntax == "1.2.840.10008.1.2.4.91"):
        return {}  # not lossy, or JPEG 2000 that the file says was lossless
    history = {"LossyImageCompression": "01", "LossyImageCompressionMethod": LOSSY_TRANSFER_SYNTAXES[syntax]}
    try:
        raw = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) / 8
        history["LossyImageCompressionRatio"] = f"{raw / max(len(ds.PixelData), 1):.2f}"[:16]
    except (AttributeError, TypeError, ValueError):
        pass
    return history


def read_xray(path, *, default_field_of_view_mm: float = 400.0) -> XRayImage:
    """Read a DX, CR or SC chest X-ray: modality LUT, VOI LUT/window, MONOCHROME1 inverted, scaled to [0, 1].

    Without any VOI transform the modality values are stretched min-max. Spacing comes from
    Pixel Spacing, Imager Pixel Spacing or Nominal Scanned Pixel Spacing (in that order), else
    ``default_field_of_view_mm`` / size. The returned
    dataset is the source header with the pixel data removed (for edit-mode references).
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise InputError(f"{name}: the X-ray file {'is a directory' if path.is_dir() else 'does not exist'}.")
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise InputError(f"{name}: not a DICOM file (no DICM preamble or readable header).") from None
    except Exception as error:  # truncated or corrupt headers raise many different exceptions
        raise InputError(f"{name}: the DICOM file is corrupt and cannot be read ({type(error).__name__}).") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InputError(f"{name}: {_without_pixels(ds)}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(f"{name}: multi-frame DICOM ({frames} frames) is not supported; give a single 2D X-ray.")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric in ("RGB", "PALETTE COLOR") or photometric.startswith("YBR"):
        raise InputError(f"{name}: colour images ({photometric or 'several samples per pixel'}) are not supported; give a grayscale X-ray.")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(f"{name}: unsupported photometric interpretation {photometric or '(missing)'}; only MONOCHROME1 and MONOCHROME2 are read.")
    try:
        stored = ds.pixel_array
    except Exception as error:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", str(syntax))
        raise InputError(f"{name}: the pixel data cannot be decoded (transfer syntax {syntax_name}: {type(error).__name__}).") from None
    if stored.ndim != 2:
        raise InputError(f"{name}: expected a 2D image but the pixel data has shape {stored.shape}.")
    rows, cols = stored.shape
    if min(rows, cols) < MIN_IMAGE_SIDE or max(rows, cols) > MAX_IMAGE_SIDE:
        raise InputError(f"{name}: {rows}x{cols} pixels cannot be a chest X-ray (each side must be {MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE}).")

    values = apply_modality_lut(stored, ds)
    if values.dtype.kind == "f" and np.array_equal(values, np.round(values)):
        values = values.astype(np.int64)  # integer rescale results: VOI LUT tables are indexed by integers
    has_voi = ("WindowCenter" in ds and "WindowWidth" in ds) or "VOILUTSequence" in ds
    if has_voi:
        if "VOILUTSequence" in ds:
            # Clamp to the LUT's input range first: pydicom indexes in the LUT's own (8/16-bit) type, which wraps.
            first, entries = int(ds.VOILUTSequence[0].LUTDescriptor[1]), int(ds.VOILUTSequence[0].LUTDescriptor[0]) or 65536
            values = np.clip(values, first, first + entries - 1)
        values = apply_voi_lut(values, ds)
        low, high = _voi_output_range(ds)
    else:
        low, high = float(np.min(values)), float(np.max(values))
    values = np.asarray(values, dtype=np.float64)
    if high > low:
        pixels = (values - low) / (high - low)
    else:
        pixels = np.zeros_like(values)
    pixels = np.clip(pixels, 0.0, 1.0).astype(np.float32)
    # MONOCHROME1 (and a MONOCHROME2 image with an INVERSE presentation LUT) displays low values as white.
    if photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        pixels = 1.0 - pixels
    header = ds.copy()
    for keyword, value in _lossy_history(ds).items():  # kept in the header: the edit inherits it
        setattr(header, keyword, value)
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in header:
            delattr(header, keyword)
    spacing = _spacing_from(ds)
    from_file = spacing is not None
    if spacing is None:
        spacing = (default_field_of_view_mm / rows, default_field_of_view_mm / cols)
    return XRayImage(pixels=pixels, pixel_spacing_mm=spacing, dataset=header, spacing_from_file=from_file)


# ---------------------------------------------------------------------------- output


def _code(entry: dict | None) -> Code | None:
    if not entry:
        return None
    return Code(value=entry["value"], scheme_designator=entry["scheme"], meaning=entry["meaning"])


def _provenance_summary(provenance: dict) -> str:
    """Human-readable one-liner for Derivation Description (ST, max 1024 characters)."""
    keys = ("model_id", "seed", "steps", "anatomy_steps", "guidance", "findings", "weights_hash")
    parts = [f"{k}={provenance[k]}" for k in keys if k in provenance]
    return ("Synthetic image generated by xreal-engine (XReal latent diffusion); " + ", ".join(parts))[:1024]


def _validate_image(image, pixel_spacing_mm) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 2:
        raise InputError(f"The generated image must be 2D, got shape {array.shape}.")
    if min(array.shape) < MIN_IMAGE_SIDE or max(array.shape) > MAX_IMAGE_SIDE:
        raise InputError(f"The generated image of {array.shape[0]}x{array.shape[1]} pixels is outside {MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE} per side.")
    if not np.all(np.isfinite(array)):
        raise InputError("The generated image contains NaN or infinite values.")
    spacing = tuple(float(s) for s in pixel_spacing_mm)
    if len(spacing) != 2 or not all(s > 0 and np.isfinite(s) for s in spacing):
        raise InputError(f"pixel_spacing_mm must be two positive numbers, got {pixel_spacing_mm!r}.")
    return array


def _patient_study_attributes(reference: pydicom.Dataset | None) -> dict:
    """Patient/study of a reference dataset (allow-list), or a new synthetic patient and study."""
    if reference is not None:
        missing = [k for k in ("StudyInstanceUID",) if k not in reference]
        if missing:
            raise InputError("The source X-ray has no Study Instance UID, so the result cannot join its study.")
        return {k: reference[k].value for k in PATIENT_STUDY_KEYWORDS if k in reference}
    now = datetime.datetime.now()
    return {
        "PatientName": SYNTHETIC_PATIENT_NAME,
        "PatientID": "XREAL-" + secrets.token_hex(6).upper(),
        "PatientBirthDate": "",
        "PatientSex": "O",
        "StudyInstanceUID": hd.UID(),
        "StudyDate": now.strftime("%Y%m%d"),
        "StudyTime": now.strftime("%H%M%S"),
        "StudyID": "XREAL",
        "AccessionNumber": "",
        "ReferringPhysicianName": "",
        "StudyDescription": "SYNTHETIC chest X-ray (XReal)",
    }


def build_secondary_capture(image, pixel_spacing_mm, provenance: dict, source: pydicom.Dataset | None = None, study=None) -> pydicom.Dataset:
    """A synthetic, 16-bit MONOCHROME2 Secondary Capture of ``image`` (float in [0, 1]).

    ``source`` (edit mode): the real X-ray; its patient and study are reused and it is
    referenced, nothing else is copied. ``study``: an earlier result dataset whose
    (synthetic) patient and study are reused, e.g. for an interpolation series.
    Geometry: see the module docstring.
    """
    array = _validate_image(image, pixel_spacing_mm)
    spacing = [float(s) for s in pixel_spacing_mm]
    pixels = np.round(np.clip(array.astype(np.float64), 0.0, 1.0) * 65535.0).astype(np.uint16)
    attributes = _patient_study_attributes(source if source is not None else study)

    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=16,
        coordinate_system="PATIENT",
        study_instance_uid=attributes["StudyInstanceUID"],
        series_instance_uid=hd.UID(),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_id=attributes.get("PatientID"),
        patient_name=attributes.get("PatientName"),
        patient_birth_date=attributes.get("PatientBirthDate") or None,
        patient_sex=attributes.get("PatientSex") or None,
        accession_number=attributes.get("AccessionNumber") or None,
        study_id=attributes.get("StudyID") or None,
        study_date=attributes.get("StudyDate") or None,
        study_time=attributes.get("StudyTime") or None,
        referring_physician_name=attributes.get("ReferringPhysicianName") or None,
        pixel_spacing=(spacing[0], spacing[1]),
        patient_orientation=PATIENT_ORIENTATION,
    )
    # UTF-8, so that names copied from a source in any character set are stored faithfully.
    sc.SpecificCharacterSet = "ISO_IR 192"
    for keyword in ("IssuerOfPatientID", "StudyDescription"):
        if attributes.get(keyword):
            setattr(sc, keyword, attributes[keyword])

    # Synthetic markings, wherever a reader looks.
    sc.ConversionType = "SYN"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.SyntheticData = "YES"
    sc.BurnedInAnnotation = _burned_in_annotation(provenance, source)
    sc.SeriesDescription = f"SYNTHETIC chest X-ray (XReal {provenance.get('model_id', 'model')})"[:64]
    sc.BodyPartExamined = "CHEST"
    sc.ManufacturerModelName = MODEL_NAME
    sc.SoftwareVersions = __version__
    # Once lossy, always (PS3.3 C.7.6.1.1.5): an edit keeps the source's pixels outside its regions.
    lossy = _lossy_history(source) if source is not None else {}
    sc.LossyImageCompression = "01" if lossy else "00"
    for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if keyword in lossy:
            setattr(sc, keyword, lossy[keyword])

    # Display: full 16-bit range, so the model's [0, 1] output shows as generated.
    sc.WindowCenter = "32767.5"
    sc.WindowWidth = "65536"
    sc.VOILUTFunction = "LINEAR"

    # Geometry that Slicer's scalar-volume loader and dcmqi agree on (module docstring).
    sc.FrameOfReferenceUID = hd.UID()
    sc.PositionReferenceIndicator = ""
    sc.ImagePositionPatient = [0.0, 0.0, 0.0]
    sc.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    sc.NominalScannedPixelSpacing = sc.PixelSpacing

    # Provenance, standard attributes only.
    sc.ImageComments = provenance_comment(provenance)
    sc.DerivationDescription = _provenance_summary(provenance)

    if source is not None:
        _reference_source(sc, source)
    return sc


def _reference_source(sc: pydicom.Dataset, source: pydicom.Dataset) -> None:
    """Source Image Sequence and Referenced Series Sequence pointing at the edited real X-ray."""
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"):
        if keyword not in source:
            raise InputError(f"The source X-ray has no {keyword}, so the result cannot reference it.")
    image_item = pydicom.Dataset()
    image_item.ReferencedSOPClassUID = source.SOPClassUID
    image_item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = pydicom.Dataset()
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    image_item.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [image_item]

    instance_item = pydicom.Dataset()
    instance_item.ReferencedSOPClassUID = source.SOPClassUID
    instance_item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    series_item = pydicom.Dataset()
    series_item.SeriesInstanceUID = source.SeriesInstanceUID
    series_item.ReferencedInstanceSequence = [instance_item]
    sc.ReferencedSeriesSequence = [series_item]
    edited = "synthetic" if str(source.get("SyntheticData", "")).upper() == "YES" else "real"
    sc.DerivationDescription = (f"Edited {edited} image: " + sc.DerivationDescription)[:1024]


def _burned_in_annotation(provenance: dict, source: pydicom.Dataset | None) -> str:
    """NO for a generated image; an edit keeps the source's pixels outside its region, so it keeps the
    source's answer, and says YES when the source does not answer (a de-identifier must then look)."""
    if provenance.get("mode") != "edit":
        return "NO"
    answer = str(source.get("BurnedInAnnotation", "")).upper() if source is not None else ""
    return answer if answer in ("YES", "NO") else "YES"


IMAGE_COMMENTS_MAX = 10240  # Image Comments is LT: at most 10240 characters
SHORTENED = "(shortened to fit Image Comments; provenance.json has it in full)"


def provenance_comment(provenance: dict) -> str:
    """``XREAL-PROVENANCE <json>`` within Image Comments' 10240 characters, and always valid JSON.

    When the full provenance does not fit (many warnings, long file lists), its longest values are
    replaced by a note, longest first, and their keys listed under ``shortened``; the short values
    that reproduce the image (seed, model, weights hash, sampler, steps) are the last to go.
    """
    compact = dict(provenance)
    shortened = []

    def text() -> str:
        extra = {"shortened": sorted(shortened)} if shortened else {}
        return PROVENANCE_PREFIX + json.dumps({**compact, **extra}, sort_keys=True, default=str)

    while len(text()) > IMAGE_COMMENTS_MAX:
        candidates = [key for key in compact if key not in shortened]
        if not candidates:
            return PROVENANCE_PREFIX + json.dumps({"shortened": SHORTENED})
        longest = max(candidates, key=lambda key: len(json.dumps(compact[key], default=str)))
        compact[longest] = SHORTENED
        shortened.append(longest)
    return text()


def segment_labels(segments: list[SegmentSpec], key: str = "display_name") -> list[str]:
    """Each segment's vocabulary name (``display_name`` or ``name``), repeats numbered ("Pneumonia",
    "Pneumonia 2"), so that two regions with one finding stay apart in a SEG reader and in Slicer."""
    labels: list[str] = []
    for spec in segments:
        labels.append(numbered_name(spec.vocabulary_entry()[key][:60], labels))
    return labels


def _segment_description(number: int, spec: SegmentSpec, label: str) -> hd.seg.SegmentDescription:
    entry = spec.vocabulary_entry()
    regions = [_code(entry["anatomic_region"])] if entry.get("anatomic_region") else None
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=_code(entry["category"]),
        segmented_property_type=_code(entry["type"]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        anatomic_regions=regions,
        display_color=hd.color.CIELabColor.from_rgb(*entry["color"]),
    )
    if entry.get("type_modifier"):
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(_code(entry["type_modifier"]))
        ]
    return description


def build_segmentation(sc: pydicom.Dataset, segments: list[SegmentSpec], provenance: dict) -> pydicom.Dataset:
    """A binary DICOM SEG on the SC's grid: one segment per non-empty mask, overlaps kept, MANUAL, vocabulary codes."""
    shape = (int(sc.Rows), int(sc.Columns))
    kept: list[SegmentSpec] = []
    for index, spec in enumerate(segments, start=1):
        mask = np.asarray(spec.mask)
        if mask.shape != shape:
            raise InputError(f"Segment mask {index} has shape {mask.shape} but the image is {shape[0]}x{shape[1]}.")
        if mask.any():
            kept.append(SegmentSpec(mask=mask.astype(bool), label=spec.label, finding=spec.finding,
                                    removal=spec.removal, attention=spec.attention))
    if not kept:
        raise InputError("There is no non-empty segment to write into the DICOM SEG.")
    labels = segment_labels(kept)
    descriptions = [_segment_description(number, spec, label)
                    for number, (spec, label) in enumerate(zip(kept, labels), start=1)]
    pixel_array = np.stack([spec.mask for spec in kept], axis=-1)[np.newaxis].astype(np.uint8)
    # highdicom reads Slice Thickness for the SEG's Pixel Measures; a planar SC has none, so the
    # SEG is built from a copy that states 1 mm (the canvas' k spacing in Slicer). The SC stays as it is.
    geometry_source = copy.deepcopy(sc)
    geometry_source.SliceThickness = 1.0
    seg = hd.seg.Segmentation(
        source_images=[geometry_source],
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=__version__,
        device_serial_number=str(provenance.get("model_id", "unknown"))[:64],
        content_label="XREAL_MASKS",
        content_description=f"Masks that generated a synthetic image, seed {provenance.get('seed', '?')}"[:64],
        content_creator_name=None,
        omit_empty_frames=False,
    )
    if "ContentCreatorName" not in seg:
        seg.ContentCreatorName = None  # Type 2 in the Content Identification Macro: present, empty (dcmqi checks it)
    seg.SyntheticData = "YES"
    seg.ImageComments = sc.ImageComments  # the same provenance JSON as the SC (General Image module, in the SEG IOD too)
    seg.SeriesDescription = f"SYNTHETIC masks (XReal {provenance.get('model_id', 'model')})"[:64]
    seg.BodyPartExamined = "CHEST"
    return seg


def write_dicom_pair(out_dir, image, pixel_spacing_mm, segments, provenance, source=None, study=None) -> dict:
    """Build SC and SEG, then write ``out_dir/sc.dcm`` and ``out_dir/seg.dcm``; nothing is written if either fails.

    When no segment has any pixel there is nothing to segment: only ``sc.dcm`` is written and
    the SEG UIDs are None. (Every request the engine accepts has at least one non-empty mask;
    an edit that only removes a finding records its region as a "removed finding" segment.)
    """
    out_dir = Path(out_dir)
    sc = build_secondary_capture(image, pixel_spacing_mm, provenance, source=source, study=study)
    has_segments = any(np.asarray(spec.mask).any() for spec in segments)
    seg = build_segmentation(sc, segments, provenance) if has_segments else None
    out_dir.mkdir(parents=True, exist_ok=True)
    to_write = [("sc.dcm", sc)] + ([("seg.dcm", seg)] if seg is not None else [])
    # Content, Study and Instance Creation times are this machine's local time (highdicom's and ours);
    # the offset says which, as provenance.json's UTC "created" does (SOP Common Module).
    offset = datetime.datetime.now().astimezone().strftime("%z")
    for _name, dataset in to_write:
        dataset.TimezoneOffsetFromUTC = offset
    written = []
    try:
        for name, dataset in to_write:
            partial = out_dir / f".{name}.partial"
            written.append(partial)
            dataset.save_as(partial, enforce_file_format=True)
        for (name, _), partial in zip(to_write, written):
            os.replace(partial, out_dir / name)
    finally:
        for partial in written:
            partial.unlink(missing_ok=True)
    return {
        "study_instance_uid": str(sc.StudyInstanceUID),
        "sc_series_instance_uid": str(sc.SeriesInstanceUID),
        "sc_sop_instance_uid": str(sc.SOPInstanceUID),
        "seg_series_instance_uid": str(seg.SeriesInstanceUID) if seg is not None else None,
        "seg_sop_instance_uid": str(seg.SOPInstanceUID) if seg is not None else None,
        "frame_of_reference_uid": str(sc.FrameOfReferenceUID),
    }
