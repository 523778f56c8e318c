"""The planner: GLM-Image's autoregressive stage as a streaming gRPC service."""
