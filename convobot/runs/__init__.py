"""Runs and releases on disk, and loading models from them.

    rundir.py    the run dir convobot train writes: layout (every file name spelt once), lock, read and write
    bundle.py    the release bundle's format: report, SHA256SUMS written and verified
    loading.py   a model from a bundle, a run dir or a run's adapter/ (safetensors only, checksums first)
    tracking.py  MLflow, TensorBoard or W&B: a run's or an evaluation's config, metrics, results and files
"""
