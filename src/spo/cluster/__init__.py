"""Training beyond one pod: the train step as a Kubeflow Trainer v2 ``TrainJob``.

:mod:`spo.cluster.trainjob` builds the TrainJob from the platform file's train pool (validated
against the CRD vendored in ``crds/``), :mod:`spo.cluster.launcher` creates it and follows it to
the end, and :mod:`spo.cluster.step` is what the pipeline's launcher task runs in its pod.
"""
