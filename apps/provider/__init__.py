"""The data provider: images of a mounted folder, annotation storage, sessions and their tokens."""
