"""Errors of ``fedscan pretrain`` (part of the glue layer's tree, ``fedscan.errors``).

FedscanError (fedscan.errors)
└── PretrainError       exit 17  bad settings, no usable images, an inbox that is not a folder

A dataset folder without ``index.csv`` is ``fedscan.errors.DatasetError`` (exit 10), an unknown
architecture ``export.errors.UnknownArchError`` (exit 2), as for every other command.
"""

from __future__ import annotations

from fedscan.errors import FedscanError


class PretrainError(FedscanError):
    exit_code = 17
