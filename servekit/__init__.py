"""Small helpers the three services share: server lifecycle, errors, admission, settings, limits.

Depends on grpcio and the generated contract only (no torch), so the gateway can use it.
"""
