"""The error raised when backbone weights cannot be found, read or fitted."""
from __future__ import annotations

INSTALL_HINT = "pip install 'ncd[weights]'"


class WeightsError(ValueError):
    """A weight source cannot be read or does not match the backbone."""
