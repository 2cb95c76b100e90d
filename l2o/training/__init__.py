"""Meta-training on one machine: objects built from a config, the trainer, the curriculum, the
job."""
