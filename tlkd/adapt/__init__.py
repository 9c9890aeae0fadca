"""Domain adaptation: AdaBN, pseudo-labelling, DANN, MCC, CDAN (tlkd adapt)."""
