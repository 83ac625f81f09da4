"""SPLAM Studio: Sub-Path Linear Approximation Models (ECCV 2024) for few-step latent diffusion."""

__version__ = "0.1.0"
