"""Memory sizes as people write them ("10GiB", "512MiB", "1.5GB") turned into bytes.

The budget planner and the CLI take sizes in these words; a bad one is an error
raised before any work starts, naming the text and what is accepted.
"""

import math
import re

from aalconvert.errors import ConversionError

# Binary units (KiB, MiB, ...) are powers of 1024; decimal ones (KB, MB, ...) powers of 1000.
UNITS: dict[str, int] = {
    "b": 1,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
}
SPELLINGS = ("B", "KiB", "MiB", "GiB", "TiB", "KB", "MB", "GB", "TB")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(size: str | int) -> int:
    """Bytes in ``size``: an int (bytes) or a number with a unit, e.g. "10GiB", "512 MiB", "1.5GB".

    Units are case-insensitive; a number alone means bytes. Raises
    ConversionError for anything else (negative, zero, unknown unit, not a number).
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ConversionError(
            f"a memory size must be a string such as '10GiB' or a number of bytes, got "
            f"{type(size).__name__} {size!r}")
    if isinstance(size, int):
        count = size
    else:
        match = _SIZE.match(size)
        unit = match.group(2).lower() if match else ""
        if match is None or (unit and unit not in UNITS):
            raise ConversionError(
                f"bad memory size {size!r}: expected a number and a unit, e.g. '10GiB', '512MiB', "
                f"'1.5GB' (units: {', '.join(SPELLINGS)}; a number alone is bytes)")
        count = math.floor(float(match.group(1)) * UNITS[unit or "b"])
    if count <= 0:
        raise ConversionError(f"a memory size must be positive, got {size!r}")
    return count

