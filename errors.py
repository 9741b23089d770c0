"""The toolkit's error types. Each message names the file, option or value and the fix; the command lines
print it as one `error: ...` line and exit with status 2 (bad input) or 1 (a run that failed)."""
from __future__ import annotations


class DataError(ValueError):
    """Bad data or datasplit: the message names the file/row and the fix."""


class RunFileError(RuntimeError):
    """A run file that cannot be read or written; the message names the file and the fix."""
