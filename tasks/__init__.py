"""Pipeline tasks around the spf library: MLflow tracking, the safety-gated model registry."""
