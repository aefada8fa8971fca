"""MLflow "models from code" definition of a metaloop domain classifier.

MLflow logs this file (not a pickled object) and runs it at load time. The classifier
folder (safetensors or ONNX + tokenizer + config) travels as the artifact `classifier`,
and the runtime that reads it travels as code (`metaloop/serving.py` and, for ONNX,
`metaloop/onnx_runtime.py` alone: no torch), so a serving host needs only the version's
own requirements.txt.

    model = mlflow.pyfunc.load_model("models:/metaloop-hospitality@champion")
    model.predict(["can I keep my room until 2pm?"])                    # DataFrame: label, score
    model.predict(["can I keep my room until 2pm?"], params={"top_k": 3})  # + top_labels, top_scores
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
        k = int((params or {}).get("top_k") or 1)
        top = self.classifier.top_k([str(t) for t in texts], k)
        out = pd.DataFrame({"label": [t[0][0] for t in top], "score": [t[0][1] for t in top]})
        if k > 1:
            out["top_labels"] = [[label for label, _ in t] for t in top]
            out["top_scores"] = [[score for _, score in t] for t in top]
        return out


mlflow.models.set_model(MetaloopClassifier())
