"""Transports: thin adapters between a wire protocol and the app; they know nothing of models."""
