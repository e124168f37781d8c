"""ImageFolder -> FFCV .beton files: `python -m convert`.

Files are validated in the converter's own processes before FFCV sees them; see `pipeline.convert_source`.
"""
