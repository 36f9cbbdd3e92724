"""Small files that other processes read while they are being rewritten (progress, sweep peers' evaluations)."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json_atomically(path: str, data: Any) -> None:
    """Write to a temporary file beside `path`, then rename over it: a reader never sees half a file."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    os.replace(temporary, path)
