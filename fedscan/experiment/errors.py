"""Errors of ``fedscan experiment`` (part of the glue layer's tree, ``fedscan.errors``).

FedscanError (fedscan.errors)
└── ExperimentError     exit 16  bad settings, a partition that cannot be made, a failed arm
"""

from __future__ import annotations

from fedscan.errors import FedscanError


class ExperimentError(FedscanError):
    exit_code = 16
