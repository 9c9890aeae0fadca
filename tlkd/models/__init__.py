"""Models from the timm registry: building, new heads, local weights and freezing."""
