"""The DICOM objects the node sends back into the source study, as a new series marked derived and
AI-generated: a Comprehensive SR (TID 1500 measurement report) listing every finding with probability,
operating threshold and decision, and a Secondary Capture of the heatmap overlay for each of the most
probable positive findings (``medai.analysis.REPORT_HEATMAPS``, as the PDF report) with a burned-in banner.

Both copy from the source only what filing them needs (patient, study and accession attributes; highdicom's
``from_ref_dataset`` / evidence handling) and nothing else. Their UIDs are derived from the source SOP
Instance UID and the model's sha256: the same image analysed by the same model always gives the same
objects, so sending them again (after a crash between sending and recording it) replaces, never duplicates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medai import __version__

MANUFACTURER = "MedAI CXR"
BANNER = "AI result - research use, not for diagnosis"
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
SCHEME = "99MEDAI"  # private coding scheme for the model's finding labels
_PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
_ABSENT = hd.sr.CodedConcept("2667000", "SCT", "Absent")
_PROBABILITY = hd.sr.CodedConcept("PROB", SCHEME, "Model probability")
_THRESHOLD = hd.sr.CodedConcept("THRESH", SCHEME, "Operating threshold")
_UNITY = hd.sr.CodedConcept("1", "UCUM", "no units")
_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")


@dataclass(frozen=True)
class FindingResult:
    finding: str
    probability: float
    threshold: float
    positive: bool


def result_uid(source_sop_uid: str, model_sha256: str, what: str) -> str:
    """A UID that is the same for the same source image, model and object (``sr``, ``sc-<finding>``,
    the series)."""
    return generate_uid(entropy_srcs=[source_sop_uid, model_sha256, what])


def _concept(label: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(label[:64], SCHEME, label.replace("_", " "))


def structured_report(source: Dataset, results: list[FindingResult], model_name: str, model_sha256: str
                      ) -> hd.sr.ComprehensiveSR:
    """TID 1500: one measurement group per finding (probability and operating threshold as measurements,
    the decision as a qualitative evaluation, the source image referenced), the model as the observing
    device and the algorithm (name and sha256)."""
    sop_uid = source.SOPInstanceUID
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid(sop_uid, model_sha256, "device"), name=model_name[:64], manufacturer_name=MANUFACTURER,
        model_name=model_name[:64], serial_number=model_sha256[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    algorithm = hd.sr.AlgorithmIdentification(name=model_name[:64], version=model_sha256[:64],
                                              manufacturer=MANUFACTURER)
    groups = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(sop_uid, model_sha256, f"track-{r.finding}"),
                                                     identifier=r.finding[:64]),
        finding_type=_concept(r.finding), algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=[hd.sr.Measurement(name=_PROBABILITY, value=round(float(r.probability), 6), unit=_UNITY),
                      hd.sr.Measurement(name=_THRESHOLD, value=round(float(r.threshold), 6), unit=_UNITY)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=_concept(r.finding),
                                                             value=_PRESENT if r.positive else _ABSENT)])
        for r in results]
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=_CHEST_XRAY,
                                     imaging_measurements=groups)
    return _clean_copied(hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0], series_instance_uid=result_uid(sop_uid, model_sha256, "sr-series"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=result_uid(sop_uid, model_sha256, "sr"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, series_description=f"AI findings ({model_name})"[:64],
        transfer_syntax_uid=ExplicitVRLittleEndian, software_versions=__version__))


def _clean_copied(ds: Dataset) -> Dataset:
    """Repair or drop a copied patient attribute whose value its VR forbids (an age of ``62`` instead of
    ``062Y``), so that a source's own encoding error does not make our object invalid."""
    age = str(ds.get("PatientAge") or "")
    if age and not re.fullmatch(r"\d{3}[DWMY]", age):
        if age.isdigit() and len(age) <= 3:
            ds.PatientAge = f"{int(age):03d}Y"
        else:
            del ds.PatientAge
    return ds


def _banner(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """The overlay with a black strip on top carrying ``lines`` in white (burned in)."""
    height, width = rgb.shape[:2]
    size = max(12, width // 48)
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    strip = (size + 6) * len(lines) + 6
    canvas = Image.new("RGB", (width, height + strip), "black")
    canvas.paste(Image.fromarray(rgb), (0, strip))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((6, 6 + i * (size + 6)), line, fill="white", font=font)
    return np.asarray(canvas)


def overlay_image(source: Dataset, rgb: np.ndarray, result: FindingResult, model_name: str, model_sha256: str,
                  instance_number: int = 1) -> hd.sc.SCImage:
    """A Secondary Capture (RGB) of one finding's heatmap overlay, banner burned in, in its own derived
    series of the source study."""
    sop_uid = source.SOPInstanceUID
    pixels = _banner(rgb, [BANNER, f"{model_name}: {result.finding.replace('_', ' ')} "
                                   f"p={result.probability:.2f} (threshold {result.threshold:.2f})"])
    # the source's orientation; without one, the standard display of a frontal chest film (rows to the feet,
    # columns to the patient's left)
    orientation = tuple(source.get("PatientOrientation") or ()) or ("L", "F")
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=result_uid(sop_uid, model_sha256, "sc-series"),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=result_uid(sop_uid, model_sha256, f"sc-{result.finding}"),
        instance_number=instance_number, manufacturer=MANUFACTURER, patient_orientation=orientation[:2],
        transfer_syntax_uid=ExplicitVRLittleEndian)
    # with the body part known, Laterality (type 2C, paired parts only) is rightly absent
    image.BodyPartExamined = source.get("BodyPartExamined") or "CHEST"
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.BurnedInAnnotation = "YES"
    image.SeriesDescription = f"AI heatmaps ({model_name})"[:64]
    image.DerivationDescription = f"{result.finding} heatmap by {model_name} {model_sha256[:16]}"[:1024]
    image.SoftwareVersions = __version__
    return _clean_copied(image)
