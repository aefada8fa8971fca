"""metaloop: meta-learned few-shot text classifiers, kept fresh by a scheduled pipeline.

The library is plain Python + PyTorch and imports no orchestration or tracking code;
`tasks/` and `flows/` wrap it for Prefect, DVC and MLflow.
"""

__version__ = "0.1.0"
