"""Generated protobuf code for the inferpool.v1 contract (make proto). Do not edit."""
