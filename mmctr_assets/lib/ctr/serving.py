"""The registered model as an MLflow pyfunc (logged "from code": MLflow stores this file, not a
pickle), so `mlflow.pyfunc.load_model("models:/mmctr-ctr@champion")` and `mlflow models serve`
score MicroLens-format rows without this project's Dagster code.

Input: a table with user_id, item_seq (list of item ids, left-padded with 0), item_id, likes_level,
views_level; output: the click probability of each row, in row order.
"""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd

INPUT_COLUMNS = (("user_id", "long"), ("item_id", "long"), ("likes_level", "long"), ("views_level", "long"))


def signature():
    """The explicit signature (MLflow infers one only from an example, which costs a model load)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = [ColSpec(t, name) for name, t in INPUT_COLUMNS] + [ColSpec(Array("long"), "item_seq")]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([ColSpec("float", "probability")]))


class CTRPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from mmctr_assets.lib.ctr.artifacts import load_model

        self.model = load_model(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        import numpy as np
        import polars as pl

        from mmctr_assets.lib.ctr import inference, tensors

        frame = pl.from_pandas(model_input) if not isinstance(model_input, pl.DataFrame) else model_input
        frame = frame.with_columns(pl.col("item_seq").cast(pl.List(pl.Int64)))
        t = tensors.to_tensors(frame, self.model.config.max_len, n_items=self.model.n_items,
                               level_vocab_size=self.model.config.level_vocab_size)
        return np.asarray(inference.predict(self.model, t), dtype=np.float32)


mlflow.models.set_model(CTRPyfunc())
