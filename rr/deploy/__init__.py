"""Kubernetes deployment: RayJob manifests from a job config and a cluster profile, submitted with the kubernetes client."""
