"""The series verdict as a DICOM Structured Report: TID 1500 Measurement Report.

highdicom ``Comprehensive3DSR`` with a ``MeasurementReport`` (TID 1500) whose one measurement
group (TID 1501) holds

    finding type         SCT 840539006 "COVID-19" (disease caused by SARS-CoV-2)
    algorithm (TID 4019) fedscan, version = model version, parameters: rule, threshold, band,
                         calibration state in words, slices used
    qualitative          "Finding" (DCM 121071) = COVID-19 suspected / not suspected /
                         uncertain (local codes 99FEDSCAN); "Model calibration" = calibrated /
                         uncalibrated / untrained
    measurements         series score, decision threshold, uncertain band (UCUM "1")

and an image library (TID 1600) describing the key slices (highest P(covid)) plus the
Current Requested Procedure Evidence Sequence naming every source instance. The SR joins the
source study as a new series; of the source it carries the patient and study modules only.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from edge_node.results.common import MANUFACTURER, SeriesFinding, new_uid, patient_study_view

SCHEME = "99FEDSCAN"  # private coding scheme of the local codes below
COVID19 = Code("840539006", "SCT", "COVID-19")  # SNOMED CT: disease caused by SARS-CoV-2
VERDICT_CODES = {
    "covid": Code("covid", SCHEME, "COVID-19 pattern suspected"),
    "non_covid": Code("non_covid", SCHEME, "COVID-19 pattern not suspected"),
    "uncertain": Code("uncertain", SCHEME, "Uncertain (score within the uncertain band)"),
}
CALIBRATION_NAME = Code("calibration", SCHEME, "Model calibration")
CALIBRATION_CODES = {
    "calibrated": Code("calibrated", SCHEME, "Calibrated threshold"),
    "uncalibrated": Code("uncalibrated", SCHEME, "Uncalibrated (default threshold)"),
    "untrained": Code("untrained", SCHEME, "Untrained model (random init)"),
}
SCORE = Code("series_score", SCHEME, "COVID-19 series score")
THRESHOLD = Code("threshold", SCHEME, "Decision threshold")
BAND = Code("uncertain_band", SCHEME, "Uncertain band")
UNITLESS = Code("1", "UCUM", "no units")
CT_CHEST = Code("24627-2", "LN", "CT Chest")
SERIES_NUMBER = 9901  # result series numbers sit far above the scanner's


def calibration_state(f: SeriesFinding) -> str:
    return "untrained" if f.untrained else ("calibrated" if f.calibrated else "uncalibrated")


def _library_images(sources: Sequence[Dataset]) -> list[Dataset]:
    """The sources the image library (TID 1600) can describe: cross-sectional images need
    their geometry (orientation, position, spacing); the others are in the evidence only."""
    out = []
    for src in sources:
        try:
            hd.sr.ImageLibraryEntryDescriptors(src)
        except (AttributeError, ValueError, TypeError):
            continue
        out.append(src)
    return out


def build_sr(
    finding: SeriesFinding, sources: Sequence[Dataset], library: Sequence[Dataset] | None = None
) -> hd.sr.Comprehensive3DSR:
    """The SR of one complete series; ``sources`` are its instances' headers (no pixels), all
    named in the evidence; ``library`` (default: all sources) are described in the image
    library (a 300-entry library costs tens of seconds in highdicom: the node passes the key
    slices)."""
    if not sources:
        raise ValueError("an SR needs at least one source instance")
    # highdicom copies the patient and study modules from evidence[0] and lists every
    # evidence item in the Current Requested Procedure Evidence Sequence: give it only that.
    base = patient_study_view(sources[0])
    evidence = []
    for src in sources:
        ref = Dataset()
        ref.update(base)
        for kw in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"):
            setattr(ref, kw, src.get(kw))
        evidence.append(ref)

    key = f"fedscan-sr/{finding.content_key}"
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=new_uid(f"fedscan-device/{finding.model_version}"),
            name="fedscan",
            manufacturer_name=MANUFACTURER,
            model_name=f"model {finding.model_version}"[:64],
        ),
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name="fedscan COVID-19 CT series verdict",
        version=str(finding.model_version)[:64],
        parameters=[
            f"rule={finding.rule}",
            f"threshold={finding.threshold:g}",
            f"uncertain_band={finding.uncertain_band:g}",
            f"slices_used={finding.n_slices_used}",
            f"calibration={finding.calibration_text}"[:64],
        ],
    )
    measurements = [
        hd.sr.Measurement(name=THRESHOLD, value=float(finding.threshold), unit=UNITLESS),
        hd.sr.Measurement(name=BAND, value=float(finding.uncertain_band), unit=UNITLESS),
    ]
    if finding.score is not None:
        measurements.insert(
            0, hd.sr.Measurement(name=SCORE, value=round(float(finding.score), 4), unit=UNITLESS)
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=new_uid(key + "/group"), identifier="fedscan series verdict"
        ),
        finding_type=COVID19,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=codes.DCM.Finding, value=VERDICT_CODES[finding.verdict]
            ),
            hd.sr.QualitativeEvaluation(
                name=CALIBRATION_NAME, value=CALIBRATION_CODES[calibration_state(finding)]
            ),
        ],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=CT_CHEST,
        imaging_measurements=[group],
        referenced_images=_library_images(sources if library is None else library) or None,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=new_uid(f"fedscan-sr-series/{finding.series_instance_uid}"),
        series_number=SERIES_NUMBER,
        sop_instance_uid=new_uid(key + "/instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # an AI proposal, not a verified report
    )
    sr.SeriesDescription = f"fedscan AI verdict: {finding.verdict} ({calibration_state(finding)})"
    scheme = Dataset()  # the private scheme of the local codes, declared as PS3.3 asks
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "fedscan local codes"
    scheme.CodingSchemeResponsibleOrganization = "fedscan"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr
