"""Generated protobuf code for protos/inferpool/triton (make proto): Triton's GRPCInferenceService,
a superset of the KServe v2 / Open Inference Protocol (`inference` proto package). Do not edit."""
