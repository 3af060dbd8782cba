"""DICOM bombs for the decode limits (issue 14): small files that ask for a lot of memory.

- `deflated_frame_bomb`: Deflated Image Frame Compression whose one frame inflates to
  ``inflated`` bytes while the header says 512 x 512 x 16 bit (512 KiB).
- `deflated_dataset_bomb`: Deflated Explicit VR Little Endian, a real-looking CT whose
  dataset hides a private OB element of ``hidden`` zero bytes after the pixel data.
- `many_frames`: a native CT with ``n`` frames of 1 x 1 pixel (each frame is a prediction row).
- `j2k_size_bomb` / `jpeg_size_bomb`: a small JPEG 2000 / JPEG baseline frame whose codestream
  (SIZ / SOF) declares a huge image: the decoder allocates what the codestream says.

The zeros are fed to the compressor in chunks, so building a 1 GiB bomb costs ~16 MiB.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit

from edge_node.ingest.dicom_decode import DEFLATED_IMAGE_FRAME
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


def _encapsulated_ct(path: Path, syntax: str, frame: bytes, *, rows: int, bits: int) -> Path:
    """A CT of one encapsulated ``frame`` in ``syntax`` (written via a J2K placeholder when
    pydicom does not know how to write the syntax: same padded UID length or shorter)."""
    write_ct(path, rows=rows, cols=rows)
    ds = pydicom.dcmread(path)
    if bits == 8:
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())
    return path


def j2k_size_bomb(path: Path, side: int, *, rows: int = 64) -> Path:
    """A JPEG 2000 Lossless CT of ``rows`` x ``rows`` whose codestream SIZ claims side x side
    (openjpeg allocates the SIZ size); ``side == rows`` gives the honest file."""
    write_ct(path, rows=rows, cols=rows)
    ds = pydicom.dcmread(path)
    ds.compress(JPEG2000Lossless)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    at = frame.find(b"\xff\x4f\xff\x51")
    struct.pack_into(">II", frame, at + 8, side, side)  # Xsiz, Ysiz (offsets are 0)
    struct.pack_into(">II", frame, at + 24, side, side)  # XTsiz, YTsiz: one tile, that big
    return _encapsulated_ct(path, str(JPEG2000Lossless), bytes(frame), rows=rows, bits=16)


def jpeg_size_bomb(path: Path, side: int, *, rows: int = 64) -> Path:
    """A JPEG baseline (8-bit, Pillow) CT of ``rows`` x ``rows`` whose SOF claims side x side."""
    img = Image.fromarray(np.full((rows, rows), 100, dtype=np.uint8), "L")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    frame = bytearray(buf.getvalue())
    at = frame.find(b"\xff\xc0")
    struct.pack_into(">HH", frame, at + 5, side, side)  # Y, X after length and precision
    return _encapsulated_ct(path, JPEGBaseline8Bit, bytes(frame), rows=rows, bits=8)
