"""The Kubeflow Trainer v2 ``TrainJob`` client: training beyond one pod.

:mod:`spo.cluster.trainjob` builds the TrainJob from the platform file's train pool (validated
against the CRD vendored in ``spo/kube/crds/trainer``), :mod:`spo.cluster.launcher` creates it
and follows it to the end, and :mod:`spo.cluster.preflight` checks a cluster before a submit.
The pipeline step that uses them is :mod:`spo.pipelines.train_job`; this package imports
:mod:`spo.kube` and never :mod:`spo.pipelines`.
"""
