"""The gRPC front service. Imports neither torch nor `workers`: it publishes by task name."""
