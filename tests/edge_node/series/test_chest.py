"""The chest-only filter: header rules, the lung-air content probe, and the real head CT."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from edge_node.errors import SkippedInput
from edge_node.ingest.preprocess import PreprocessParams, prepare
from edge_node.series.chest import ChestPolicy, header_reason, lung_air_fraction
from tests.helpers.dicom_factory import ct_phantom, sample_path, write_ct

CHEST = PreprocessParams(chest=ChestPolicy())


def _header(**tags: object) -> Dataset:
    ds = Dataset()
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize(
    ("tags", "reason"),
    [
        ({"BodyPartExamined": "HEAD"}, "not_chest:body_part=HEAD"),
        ({"BodyPartExamined": "ABDOMEN"}, "not_chest:body_part=ABDOMEN"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "not_chest:localizer"),
        ({"ProtocolName": "BRAIN ROUTINE"}, "not_chest:protocol=BRAIN"),
        ({"SeriesDescription": "Topogram 0.6 T20f"}, "not_chest:description=TOPOGRAM"),
        ({"BodyPartExamined": "CHEST", "SeriesDescription": "HEAD"}, None),  # body part wins
        ({"SeriesDescription": "Thorax neck 1.0"}, None),  # names the chest
        ({"SeriesDescription": "5/5mm Plain"}, None),  # no hint: the content decides
        ({"ConvolutionKernel": "H30s"}, "not_chest:kernel=H30S"),  # Siemens head kernel
        ({"ConvolutionKernel": ["Hr40", "3"]}, "not_chest:kernel=HR40_3"),
        ({"ConvolutionKernel": "B70f"}, None),  # body kernels say nothing
        ({"ConvolutionKernel": "STANDARD"}, None),
        ({"ConvolutionKernel": "H30s", "SeriesDescription": "Thorax"}, None),
    ],
)
def test_header_rules(tags: dict[str, object], reason: str | None) -> None:
    """BodyPartExamined, ImageType LOCALIZER, protocol and description words give a reason;
    a header naming the chest is never skipped by its wording."""
    assert header_reason(_header(**tags)) == reason


def test_real_head_ct_is_skipped_by_its_content() -> None:
    """The 693 head CT samples (CQ500) carry no body part or protocol: the content probe finds
    about 1% lung-like air inside the skull and skips them, reason not_chest:no_lung_air,
    with the slice's header kept for its series row."""
    for name in ("693_UNCR.dcm", "693_J2KR.dcm"):
        with pytest.raises(SkippedInput) as info:
            prepare(sample_path(name), CHEST)
        assert info.value.reason == "not_chest:no_lung_air"
        meta = info.value.meta  # type: ignore[attr-defined]
        assert meta.lung_air < 0.05 and meta.header.series_description == "5/5mm Plain"
    # without the policy the same slice is predicted as before
    assert len(prepare(sample_path("693_UNCR.dcm")).frames) == 1


def test_chest_phantom_and_header_kinds(tmp_path: object) -> None:
    """A CT with lungs and no header hint passes the probe; a HEAD body part is skipped
    before its pixels are decoded."""
    from pathlib import Path

    folder = Path(str(tmp_path))
    assert lung_air_fraction(ct_phantom()) > 0.3
    ok = prepare(write_ct(folder / "chest.dcm"), CHEST)
    assert ok.meta.lung_air is not None and ok.meta.lung_air > 0.3
    head = write_ct(folder / "head.dcm")
    import pydicom

    ds = pydicom.dcmread(head)
    ds.BodyPartExamined = "HEAD"
    ds.save_as(head)
    with pytest.raises(SkippedInput) as info:
        prepare(head, CHEST)
    assert info.value.reason == "not_chest:body_part=HEAD"


def test_synthetic_and_imported_sets_count_as_chest(tmp_path: object) -> None:
    """fedscan.synthetic CT (HU, lungs) and the dataset skeleton carry BodyPartExamined CHEST,
    so the demo keeps predicting with the filter on."""
    from pathlib import Path

    from fedscan.synthetic import generate

    out = Path(str(tmp_path)) / "syn"
    generate(out, 2, seed=0, n_patients=2)
    files = sorted(out.rglob("*.dcm"))
    assert files
    for f in files:
        p = prepare(f, CHEST)
        assert p.meta.header is not None and p.meta.header.body_part == "CHEST"
