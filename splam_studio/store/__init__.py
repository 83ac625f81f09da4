"""Files on disk, below both the trainer and the model loaders: crash-safe writes (`atomic`) and a run as files
(`runs`: name rule, weights root, `training_config.json`, `stats.jsonl`). Imports nothing else of the package."""
