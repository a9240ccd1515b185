"""Client side of fl-sim: the Flower ClientApp, local training and the gradient defenses it applies."""
