"""Progress bars (tqdm) that can be silenced with ``SPARSEQ_QUIET=1`` or ``set_quiet(True)``."""
from __future__ import annotations

import os
from typing import Iterable, Optional

from tqdm.auto import tqdm

_QUIET = [os.environ.get("SPARSEQ_QUIET") == "1"]


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar of sparseq.compress off (True) or on (False)."""
    _QUIET[0] = quiet


def progress(it: Optional[Iterable] = None, **kwargs) -> tqdm:
    """``tqdm(it, ...)`` that respects the quiet switch and keeps finished bars short."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(it, disable=_QUIET[0], **kwargs)
