"""Files: typed YAML configs and presets, checksummed checkpoints, atomic writes."""
