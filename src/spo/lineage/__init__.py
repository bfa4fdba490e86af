"""Lineage: a cluster run's outputs recorded in dvc.lock and pushed to the DVC remote, as
``dvc repro`` records a local run's, so that ``dvc pull`` restores either (docs/kubeflow.md).

Below the adapters: it imports neither :mod:`spo.pipelines` nor :mod:`spo.cluster`.
"""
