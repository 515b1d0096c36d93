"""Every environment switch nlcompile reads, in one place.

* ``NLCOMPILE_DUMP=dir``: write the graph after every pass to ``dir``.
* ``NLCOMPILE_VERBOSE=1``: print progress of long work (probing, verifying).
"""
from __future__ import annotations

import os
from pathlib import Path


def dump_dir() -> Path | None:
    value = os.environ.get("NLCOMPILE_DUMP")
    return Path(value) if value else None


def verbose() -> bool:
    return os.environ.get("NLCOMPILE_VERBOSE", "") not in ("", "0")
