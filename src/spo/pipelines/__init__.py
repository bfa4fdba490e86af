"""The Kubeflow pipeline: components, DAG, platform placement, compilation, local runs."""
