"""HALS: human-augmenting labelling of cells (features, online classifier, Coreset active learning)."""
