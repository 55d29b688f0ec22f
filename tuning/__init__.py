"""Ray Tune campaigns around the training run (the `tune:` section of the config)."""
