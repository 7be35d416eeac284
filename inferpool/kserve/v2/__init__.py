"""Generated protobuf code for protos/inferpool/kserve/v2 (make proto). Do not edit."""
