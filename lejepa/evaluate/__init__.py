"""The evaluate stage: frozen features, linear and kNN probes, label-free diagnostics, the report."""
