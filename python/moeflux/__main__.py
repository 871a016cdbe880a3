"""`python -m moeflux`: the command line."""

from .cli import _entry

_entry()
