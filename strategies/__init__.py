"""Server side of fl-sim: the honest-but-curious FedAvg strategy, server-side defense steps and the ServerApp."""
