"""Model operations: the registry of models and versions, the optimizer, rollouts."""
