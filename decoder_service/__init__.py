"""The decoder service: turns plans into pixels with the GLM-Image DiT, VAE and glyph encoder.

Layers: `servicer` (proto <-> domain), `runner` (admission, overlap of preparation with the plan
stream, progress, cancellation; no torch), `engine` (the interface), `diffusers_engine` (the
concrete engine over diffusers' GlmImagePipeline).
"""
