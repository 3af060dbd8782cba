"""`fedscan experiment`: local-only vs FedAvg vs centralized on patient-disjoint partitions."""
