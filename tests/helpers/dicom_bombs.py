"""DICOM bombs for the decode limits (issue 14): small files that ask for a lot of memory.

- `deflated_frame_bomb`: Deflated Image Frame Compression whose one frame inflates to
  ``inflated`` bytes while the header says 512 x 512 x 16 bit (512 KiB).
- `deflated_dataset_bomb`: Deflated Explicit VR Little Endian, a real-looking CT whose
  dataset hides a private OB element of ``hidden`` zero bytes after the pixel data.
- `many_frames`: a native CT with ``n`` frames of 1 x 1 pixel (each frame is a prediction row).

The zeros are fed to the compressor in chunks, so building a 1 GiB bomb costs ~16 MiB.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless

from edge_node.dicom_decode import DEFLATED_IMAGE_FRAME
from tests.helpers.dicom_factory import write_ct

CHUNK = 16 << 20


def _deflate_zeros(n: int, prefix: bytes = b"") -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = [packer.compress(prefix)]
    zeros = bytes(min(CHUNK, n))
    left = n
    while left > 0:
        take = min(left, len(zeros))
        out.append(packer.compress(zeros[:take]))
        left -= take
    out.append(packer.flush())
    return b"".join(out)


def deflated_frame_bomb(path: Path, inflated: int) -> Path:
    """One 512 x 512 16-bit frame (header) whose deflate stream inflates to ``inflated`` bytes."""
    write_ct(path, rows=512, cols=512)
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([_deflate_zeros(inflated)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    # pydicom cannot write a syntax it does not know: write J2K (same padded UID length), swap.
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue().replace(
        str(JPEG2000Lossless).encode(), DEFLATED_IMAGE_FRAME.encode() + b"\0", 1
    )
    path.write_bytes(data)
    return path


def deflated_dataset_bomb(path: Path, hidden: int, *, rows: int = 64) -> Path:
    """A small deflated CT dataset followed by private (7FE1,1000) OB of ``hidden`` zeros."""
    write_ct(path, rows=rows, cols=rows)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.add_new(0x7FE10010, "LO", "FEDSCAN TEST")  # private creator of the bomb element
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    element = struct.pack("<HH2sHI", 0x7FE1, 0x1000, b"OB", 0, hidden)
    path.write_bytes(head.getvalue() + _deflate_zeros(hidden, body.getvalue() + element))
    return path


def many_frames(path: Path, n: int) -> Path:
    """A native CT of ``n`` 1 x 1 frames (a few bytes each)."""
    return write_ct(path, hu=np.zeros((n, 1, 1)), rows=1, cols=1)
