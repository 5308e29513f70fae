"""MLflow pyfunc wrapper for a fine-tune output (LoRA adapter or full weights) on an spf base model.

Logged as *models from code* (no cloudpickle): MLflow copies this file into the model and runs it on load,
and the last line's ``set_model`` names the model object. The file imports only ``mlflow``, ``pandas``
and ``spf`` (which rides in the model's ``code`` folder), so a fresh environment built from the model's
own ``requirements.txt`` loads and serves it (``mlflow models serve``).

The logged model holds only the adapter (KBs to MBs); the base is a reference string resolved with
``spf.load_model`` at load time (``model_config["base_model"]``), unless the base folder was embedded as
the ``base`` artifact. Generation is greedy and batched (``spf.refusal.generate``), the same code path
the evaluation harness uses, so served answers match evaluated answers.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_BATCH_SIZE = 8


def prompts_from_input(model_input: Any) -> list[str]:
    """Prompts from a DataFrame with a ``prompt`` column, a list of strings, a Series or one string."""
    if isinstance(model_input, pd.DataFrame):
        if "prompt" in model_input.columns:
            values = model_input["prompt"].tolist()
        elif len(model_input.columns) == 1:
            # pyfunc turns a plain list into a one-column frame named 0 when no schema names the column.
            values = model_input.iloc[:, 0].tolist()
        else:
            raise ValueError(f"input DataFrame needs a 'prompt' column, has {list(model_input.columns)}")
    elif isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, dict) and "prompt" in model_input:
        raw = model_input["prompt"]
        values = [raw] if isinstance(raw, str) else list(raw)
    else:
        values = list(model_input)
    # {"prompt": [...]} arrives from MLflow's schema enforcement as one row holding the whole list.
    if len(values) == 1 and isinstance(values[0], (list, tuple)):
        values = list(values[0])
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise ValueError(f"prompts must be strings; rows {bad[:5]} are not")
    return values


class SPFAdapterModel(mlflow.pyfunc.PythonModel):
    """Greedy chat generation from ``base model + fine-tune output`` (a LoRA adapter, or a full fine-tune's
    weights); ``predict`` returns one string per prompt."""

    def load_context(self, context: Any) -> None:
        # Imported here so that importing this module (e.g. to log a model) does not load torch/peft.
        from spf.models import load_finetuned

        config = dict(context.model_config or {})
        base_ref = context.artifacts.get("base") or config.get("base_model")
        if not base_ref:
            raise ValueError("model has neither a 'base' artifact nor model_config['base_model']")
        output_dir = context.artifacts["adapter"]
        logger.info("loading base %s with fine-tune output %s", base_ref, output_dir)
        # One loader for every consumer (evaluate stage, benchmark, this model): a LoRA adapter on the base,
        # or a full fine-tune's own weights; safetensors only, headers and shapes checked.
        self.model, self.tokenizer = load_finetuned(str(base_ref), output_dir)
        self.max_new_tokens = int(config.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        self.batch_size = int(config.get("batch_size", DEFAULT_BATCH_SIZE))

    # `model_input: pd.DataFrame` on purpose: MLflow skips type-hint validation for DataFrame hints,
    # so both a DataFrame and a list of strings reach this method; the logged signature documents them.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        from spf.refusal import generate

        params = params or {}
        prompts = prompts_from_input(model_input)
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        return generate(
            self.model,
            self.tokenizer,
            conversations,
            max_new_tokens=int(params.get("max_new_tokens") or self.max_new_tokens),
            batch_size=int(params.get("batch_size") or self.batch_size),
        )


# models from code: the model this file defines when MLflow runs it (harmless on a plain import)
set_model(SPFAdapterModel())
