"""The KServe V2 gRPC protocol (Triton's GRPCInferenceService) beside REST, on the same data plane."""
