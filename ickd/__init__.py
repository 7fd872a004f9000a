from ickd.errors import IckdError

__version__ = "0.1.0"
__all__ = ["IckdError", "__version__"]
