"""``UsageError``: bad input from the user, in every layer of the project.

A flag, a file, an environment variable or a machine description that cannot serve: each
command's main prints the message as one line and exits 2. It lives in the lowest layer
(``affinity`` imports nothing of ours) so that the errors of every layer are one type.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user; the message names the problem and the fix."""
