"""Music Interpret plugin: profile a note dataset (stage ``note_stats``)."""

__version__ = "0.1.0"
