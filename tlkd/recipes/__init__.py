"""Recipes: one per CLI command, each a few lines over the shared builders and engine."""
