"""masml: clinical risk models for macrophage activation syndrome (MAS / secondary HLH)."""

from masml.schema import SCHEMA_VERSION

__version__ = "0.1.0"
__all__ = ["SCHEMA_VERSION", "__version__"]
