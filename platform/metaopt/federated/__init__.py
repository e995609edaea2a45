"""Federated learning: pure, Ray-free server aggregation strategies (FedAvg, FedOpt, FedExp, FedHyper)."""
