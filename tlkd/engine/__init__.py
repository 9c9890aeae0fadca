"""The one training engine: every mode is a model, an objective and this loop."""
