"""Domain adaptation: AdaBN, pseudo-labelling, DANN (tlkd adapt)."""
