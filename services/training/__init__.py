"""Training data: consensus of several annotators and inter-annotator agreement."""
