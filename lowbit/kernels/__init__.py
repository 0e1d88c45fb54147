"""Fast paths: CPU kernels for the packed formats (each tested against the reference path)."""
