"""The one exception type for problems the user can fix (bad file, bad flag, bad key).

Scripts catch it and print its message as a single line; the library never calls sys.exit.
"""
from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; the message names the file, key or flag."""
