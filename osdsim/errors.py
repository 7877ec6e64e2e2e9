"""User-facing errors: one line, naming the field or file and what is allowed (CLI exit code 2)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError


class InputError(ValueError):
    """Bad user input. The message is a single line shown as is; the CLI exits with code 2."""


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """The first pydantic error as `field.path: message` on one line."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
    # Discriminated unions add the tag name to the path; it only confuses users.
    msg = err.get("msg", "invalid value").replace("Value error, ", "")
    # Validators name a sub-field as "sub.path: message"; fold it into the field path.
    m = re.match(r"^([A-Za-z_][\w]*(?:\.[\w]+)*): (.*)$", msg, re.S)
    if m and err.get("type") == "value_error":
        loc = f"{loc}.{m.group(1)}" if loc else m.group(1)
        msg = m.group(2)
    if err.get("type") == "extra_forbidden":
        msg = "unknown field (not allowed)"
    elif err.get("type") == "missing":
        msg = "required field is missing"
    inp = err.get("input")
    shown = ""
    if err.get("type") not in ("missing", "extra_forbidden") and isinstance(inp, (int, float, str)):
        text = repr(inp)
        shown = f" (got {text[:60]})"
    path = f"{prefix}{'.' if prefix and loc else ''}{loc}"
    n_more = len(exc.errors()) - 1
    more = f" [+{n_more} more]" if n_more > 0 else ""
    return f"{path or 'scenario'}: {msg}{shown}{more}".replace("\n", " ")


def json_safe(x):
    """Replace non-finite floats (NaN, ±inf) by None, recursively, so JSON stays standard."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Write `path` atomically: yields a temporary path in the same directory (created if need be);
    when the block succeeds it is renamed over `path` (os.replace), when it raises it is removed.
    OSErrors (making the directory, the temporary file, the rename) propagate to the caller."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
