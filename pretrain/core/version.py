"""The package version, recorded in every checkpoint (a low floor, so the checkpoint layer can
read it without importing the package root)."""

__version__ = "0.1.0"
