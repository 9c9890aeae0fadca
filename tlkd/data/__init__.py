"""Datasets, class subsets, few-label selection, transforms and loaders."""
