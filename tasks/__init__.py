"""Prefect tasks: one pipeline step each. A task reads params, calls the library, logs to
MLflow (explicit run ids through MlflowClient), versions data with DVC, and returns a
small typed result. Plain functions sit beside each task so the CLI can call them too."""
