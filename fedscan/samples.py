"""Where the real CT samples are: the DICOM files (pydicom-data, MIT) that `fedscan export`
checks ONNX parity on and the benchmarks time.

One folder, given by a command's option or else ``$FEDSCAN_SAMPLES``. An installed fedscan ships
no images, so there is no built-in default: a command that needs samples and finds none says
which option to pass. In a checkout the test suite and `make bench` point at
``tests/fixtures/dicom``.
"""

from __future__ import annotations

import os
from pathlib import Path

SAMPLES_ENV = "FEDSCAN_SAMPLES"
# real CT slices: plain, JPEG 2000, implicit VR, Enhanced CT with 2 frames, VR UN
CT_SAMPLES: tuple[str, ...] = (
    "693_UNCR.dcm",
    "693_J2KR.dcm",
    "693_UNCI.dcm",
    "eCT_Supplemental.dcm",
    "explicit_VR-UN.dcm",
)


def samples_dir(explicit: Path | None = None) -> Path | None:
    """``explicit`` when given, else ``$FEDSCAN_SAMPLES`` when set, else None."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(SAMPLES_ENV)
    return Path(env) if env else None


def find_samples(names: tuple[str, ...], explicit: Path | None = None) -> list[Path]:
    """The files of ``names`` present in the samples folder, in that order (maybe none)."""
    folder = samples_dir(explicit)
    if folder is None:
        return []
    return [folder / n for n in names if (folder / n).is_file()]


def missing(option: str, names: tuple[str, ...], explicit: Path | None = None) -> str:
    """The one-line reason a command gives when the samples it needs are not found."""
    folder = samples_dir(explicit)
    if folder is None:
        return f"no CT samples folder: pass {option} DIR or set ${SAMPLES_ENV}"
    return f"CT samples {', '.join(names)} not found in {folder} (see {option} / ${SAMPLES_ENV})"
