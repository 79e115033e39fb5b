"""ifad-fast: implicit-field anomaly detection for brain MRI."""
__version__ = "0.1.0"
