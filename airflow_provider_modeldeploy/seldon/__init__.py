"""Seldon Core support: SeldonDeployment manifests from typed models, validated against the CRD."""
