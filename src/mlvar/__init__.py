"""mlvar: measure how much models vary across random seeds, and use it to debug data."""

__version__ = "0.1.0"
