"""Export formats: one module each, a ``write_<format>`` function registered by name."""

from lakepipe.export.base import ExportMeta, Format, format_for_path, formats, register_format

__all__ = ["ExportMeta", "Format", "format_for_path", "formats", "register_format"]
