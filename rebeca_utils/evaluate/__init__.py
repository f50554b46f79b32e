"""Stage 5, evaluation: retrieval metrics, statistical tests, scorers, method folders, the paper's tables."""
