"""KServe ``InferenceService`` manifests and the KServe v0.20.0 CRD they are validated against."""
