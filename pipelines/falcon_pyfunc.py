"""The MLflow pyfunc model of a Falcon package, logged from code: MLflow stores this file, not a pickle.

    model = mlflow.pyfunc.load_model("models:/falcon-smollm2@champion")      # device/dtype: model_config
    model.predict(pd.DataFrame({"prompt": ["Hi!"]}), params={"max_new_tokens": 64})

`load_context` loads the target the package names (or `model_config["target"]`, a load_target spec), checks
its fingerprint and builds the decoder (`pipelines.inference.load_falcon`). A target with its own model code
loads only with `model_config={"trust_remote_code": True}` given at load (packaging never logs that key).
`predict` takes prompts (a DataFrame with a `prompt` column or one string column, a list of strings, or one
string), applies the chat template, generates with greedy decoding or the sampling params, and returns one
row per prompt: text, num_tokens, tau, tokens_per_s, seconds, steps (see `pipelines.inference.PREDICT_COLUMNS`).

Note: `mlflow.pyfunc.load_model` runs the Python file stored in the model, so it trusts whoever can write to
the registry; `pipelines.inference.load_falcon` and its CLI read the package's data files only.
"""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from falcon.generate import SamplingConfig
from pipelines.inference import generate_text, load_falcon
from pipelines.package_format import PREDICT_COLUMNS, PREDICT_PARAMS, PYFUNC_ARTIFACT


class FalconPyfunc(PythonModel):
    def load_context(self, context):
        config = dict(context.model_config or {})
        self.package = load_falcon(context.artifacts[PYFUNC_ARTIFACT], device=config.get("device", "cpu"),
                                   dtype=config.get("dtype", "auto"), target=config.get("target"),
                                   trust_remote_code=config.get("trust_remote_code") is True)

    def predict(self, context, model_input, params=None):
        params = {**PREDICT_PARAMS, **(params or {})}
        if isinstance(model_input, pd.DataFrame):
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = model_input[column].tolist()
        else:
            prompts = [model_input] if isinstance(model_input, str) else list(model_input)
        sampling = SamplingConfig(temperature=float(params["temperature"]), top_p=float(params["top_p"]),
                                  seed=None if int(params["seed"]) < 0 else int(params["seed"]))
        rows = [generate_text(self.package, str(prompt), int(params["max_new_tokens"]), sampling).to_dict()
                for prompt in prompts]
        return pd.DataFrame(rows, columns=list(PREDICT_COLUMNS))


mlflow.models.set_model(FalconPyfunc())
