"""The toolkit's error types. Each message names the file, option or value and the fix; the command lines
print it as one `error: ...` line and exit with status 2 (bad input) or 1 (a run that failed)."""
from __future__ import annotations


class DataError(ValueError):
    """Bad data or datasplit: the message names the file/row and the fix."""


class NodeDataError(DataError):
    """Bad data that only some processes see (e.g. one node's cache folder): printed by the process that sees it,
    not only by rank 0."""


class RunFileError(RuntimeError):
    """A run file that cannot be read or written; the message names the file and the fix."""


class Interrupted(RuntimeError):
    """Ctrl-C or SIGTERM during work that keeps what it finished (e.g. cache preparation): one line, exit 130."""
