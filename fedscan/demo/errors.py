"""Errors of ``fedscan demo`` (part of the glue layer's tree, ``fedscan.errors``).

FedscanError (fedscan.errors)
└── DemoError           exit 15  a process failed to start or died, the federation did not
                                 complete in time, or the output folder is not ours to reuse
"""

from __future__ import annotations

from fedscan.errors import FedscanError


class DemoError(FedscanError):
    exit_code = 15
