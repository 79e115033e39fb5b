"""ifad-fast: implicit-field anomaly detection for brain MRI.

    import nibabel as nib
    import ifad_fast as ifad
    model = ifad.default_model()                                 # or ifad.load_model("run/model.pt")
    result = ifad.restore_array(model, nib.load("scan.nii.gz"))  # or (volume, affine): voxels -> mm
    result.anomaly, result.restoration                           # numpy (X, Y, Z), the scan's own grid
"""
__version__ = "0.1.0"

_EXPORTS = {
    "default_model": "api", "Restorer": "api", "restore_array": "api", "restore_arrays": "api", "restore_files": "api",
    "restore_config": "api", "evaluate_folders": "api", "load_model": "model", "evaluate": "metrics",
    "IfadError": "errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    """Import on first use, so `ifad-fast --help` does not pay for torch."""
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'ifad_fast' has no attribute {name!r}")
