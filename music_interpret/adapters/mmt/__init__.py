"""Adapter for the Multitrack Music Transformer (MMT, Dong et al. 2023)."""
