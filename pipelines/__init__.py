"""Ray / DeepSpeed / MLflow pipelines around the pure-torch `falcon` package."""
