"""The Kubernetes vocabulary both adapters share: the platform file (:mod:`spo.kube.platform`),
manifests and their strict validation against vendored CRDs (:mod:`spo.kube.manifests`, the
CRDs' CEL rules in :mod:`spo.kube.crd_cel`; KFP's in ``crds/kfp``, Kubeflow Trainer's in
``crds/trainer``).

The floor beneath :mod:`spo.pipelines` (the KFP adapter) and :mod:`spo.cluster` (the TrainJob
client): it imports neither.
"""
