"""The PyTorch integration: per-layer adapters, the preconditioning forward, layer discovery."""
