"""MLflow "models from code" definition of a metaloop domain classifier.

MLflow logs this file (not a pickled object) and runs it at load time. The classifier
folder (safetensors + tokenizer + config) travels as the artifact `classifier`.

    model = mlflow.pyfunc.load_model("models:/metaloop-hospitality@champion")
    model.predict(["can I keep my room until 2pm?"])   # DataFrame: label, score
"""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class MetaloopClassifier(PythonModel):
    def load_context(self, context):
        from metaloop.serving import load_classifier

        self.classifier = load_classifier(context.artifacts["classifier"])

    # pd.DataFrame is what the logged signature (a `text` column) hands over after MLflow's
    # schema enforcement. MLflow infers no signature from this hint (the explicit one stays)
    # and no longer warns "add type hints"; strings and lists still work, as below.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        if isinstance(model_input, pd.DataFrame):
            texts = model_input["text" if "text" in model_input else model_input.columns[0]].tolist()
        elif isinstance(model_input, str):
            texts = [model_input]
        else:
            texts = list(model_input)
        preds = self.classifier.predict([str(t) for t in texts])
        return pd.DataFrame({"label": [p.label for p in preds], "score": [p.score for p in preds]})


mlflow.models.set_model(MetaloopClassifier())
