"""Datasets, their sources, and the scenarios prepared from them."""
