"""The detector model: instruments and arms (``instruments``), raw frames and their
preparation to electrons with errors (``rawframe``), and the QUAL bits (``quality``)."""
