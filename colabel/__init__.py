"""colabel: collaborative AI-assisted labelling for microscopy and histology."""

__version__ = "0.1.0"
