"""The Python backend stub's interpreter, made fit for ropesp before torch is imported.

The stub embeds Python without the usual environment handling: it ignores PYTHONPATH and the other
PYTHON* variables and runs under a C locale. `prepare` (called by the repository's model.py) fixes the
two that matter here:
- open() defaults to ASCII under a C locale, and torch.compile (`--backend compile`) reads back generated
  code that quotes our sources: switch the C library's character type to UTF-8;
- where the installed packages' directories are read-only and hold no bytecode (container images), every
  model load would compile torch's ~2000 modules again (4.0 s for `import torch` in the stub against
  1.8 s with bytecode, bench/RESULTS.md): use the cache PYTHONPYCACHEPREFIX names.
"""

from __future__ import annotations

import contextlib
import locale
import os
import sys
import time

STARTED: float | None = None
"""perf_counter() when the model module began preparing (what the model's load time counts from)."""


def prepare() -> None:
    global STARTED
    STARTED = time.perf_counter()
    if locale.getpreferredencoding(False).replace("-", "").lower() != "utf8":
        for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
            with contextlib.suppress(locale.Error):  # not installed here: try the next spelling
                locale.setlocale(locale.LC_CTYPE, name)
                break
    prefix = os.environ.get("PYTHONPYCACHEPREFIX")
    if prefix and sys.pycache_prefix is None:
        sys.pycache_prefix = prefix
