"""An MLServer custom inference runtime for a model.onnx, written from MLServer's
documented API: an `MLModel` whose `load` opens the session (the model-settings.json's
`parameters.uri`, its thread count in `parameters.extra.threads`) and whose `predict`
decodes the V2 inputs with MLServer's NumPy codec, runs the session and encodes the
outputs back. Imported by MLServer from the model-settings.json that mlserver_server.py
writes."""

from __future__ import annotations

from pathlib import Path

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from ort_models import open_session


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        parameters = self.settings.parameters
        self.session = open_session(Path(parameters.uri), int(parameters.extra["threads"]))
        self.output_names = [meta.name for meta in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        values = self.session.run(None, feeds)
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[
                NumpyCodec.encode_output(name, value)
                for name, value in zip(self.output_names, values, strict=True)
            ],
        )
