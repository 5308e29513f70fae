"""Training: the typed config, the loop, the defenses as method objects, callbacks and checkpoints."""
