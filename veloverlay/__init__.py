"""veloverlay: a content-addressed store of file trees, projected as live, writable directories."""

from veloverlay.errors import Reason, SysError, VeloError

__all__ = ["Reason", "SysError", "VeloError", "__version__"]
__version__ = "0.1.0"
