"""Static HTML reports of an experiment."""
