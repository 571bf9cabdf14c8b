"""Seeded training of many model copies and the service that writes them to a run store."""
