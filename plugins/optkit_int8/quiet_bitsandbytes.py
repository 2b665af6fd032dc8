"""bitsandbytes, imported once without its import-time warning.

bitsandbytes warns at import about an optional CPU kernel package (``kernels``); its own CPU paths for int8
and 4-bit work without it, so the warning only alarms users. Imported only when a quantized model is built.
"""

import logging

_quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
_level = _quiet.level
_quiet.setLevel(logging.ERROR)
try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
finally:
    _quiet.setLevel(_level)

__all__ = ["bnb", "bnbF"]
