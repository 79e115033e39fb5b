"""The Python API: load a model, restore arrays or files, evaluate score folders.

    import ifad_fast as ifad
    model = ifad.load_model("run/model.pt")          # or ifad.default_model()
    result = ifad.restore_array(model, nib.load("scan.nii.gz"))   # or (volume, affine)
    result.anomaly                                    # numpy (X, Y, Z), the scan's own grid

A model with a physical frame (format 2, the default for new models) needs each scan's affine
(voxel -> world mm): pass a nibabel image, or the array and its affine. Without one it raises
IfadError rather than guess; cube-frame models (format-1 files such as the bundled one, or
`--frame cube`) take bare arrays as before.

The package: `restorer` (the `Restorer`, schedules and the restoring prior, the one-call wrappers),
`results` (`NativeResult`), `files` (the folder loop of `Restorer.restore_files`: loading ahead and
writing behind), `outputs` (output names, which cases are done, provenance, `write_outputs`),
`evaluation` (`evaluate_folders`), `jobs` (a process's share of `restore --nproc N`) and `calibration`
(thresholds per schedule chosen on validation cases, stored in the model). They import one way:
results <- outputs <- files <- restorer <- jobs, calibration; evaluation stands alone.
"""
from __future__ import annotations

from .calibration import calibrate
from .evaluation import evaluate_folders, maps_method, summaries_method
from .jobs import RestoreJob, check_job, restore_shard
from .outputs import (
                      RUN_ARGS,
                      bids_folder,
                      case_outputs,
                      cases_with_outputs,
                      file_sha256,
                      portable_path,
                      refuse_existing,
                      run_provenance,
                      write_bids_description,
                      write_outputs,
)
from .restorer import (
                      PROTOCOLS,
                      Restorer,
                      check_variant_options,
                      default_model,
                      model_grid_maps,
                      parse_phases,
                      resolve_threshold,
                      restore_array,
                      restore_arrays,
                      restore_config,
                      restore_files,
                      restoring_prior,
                      with_bias_correction,
                      with_registration,
)
from .results import NativeResult

__all__ = ["NativeResult", "PROTOCOLS", "RUN_ARGS", "RestoreJob", "Restorer", "bids_folder", "calibrate", "case_outputs",
           "cases_with_outputs", "check_job", "check_variant_options", "default_model", "evaluate_folders",
           "file_sha256", "maps_method", "model_grid_maps", "parse_phases", "portable_path",
           "refuse_existing", "resolve_threshold", "restore_array", "restore_arrays", "restore_config",
           "restore_files", "restore_shard", "restoring_prior", "run_provenance", "summaries_method",
           "with_bias_correction", "with_registration", "write_bids_description", "write_outputs"]
