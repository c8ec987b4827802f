"""The ML core (imported as detoxflow.models): torch / transformers / peft only, no prefect, no mlflow."""
