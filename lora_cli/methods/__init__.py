"""Training methods: one module per method, each building its TRL config and trainer from the recipe."""
