"""LightningModules: losses, metrics, optimisers and logging around an hgrn2 backbone."""
