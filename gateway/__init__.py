"""The gateway: the public ImageService, chaining a planner and a decoder. No torch, no model code."""
