"""Development kit: the tiny GLM-Image and the monolithic reference the services are checked against.

Used by the tests, the benchmarks, `make tiny-model` and `make demo`; never by the services.
"""
