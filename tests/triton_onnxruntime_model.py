"""Stand-in for Triton's C++ onnxruntime backend, as a Python-based backend (``backends/onnxruntime/model.py``).

No package registry ships the C++ backend, so the tests let Triton's Python-based backend feature serve the
repository's unchanged ``platform: "onnxruntime_onnx"`` model: the real core still parses the config,
schedules, dynamically batches and counts executions; only the forward runs here, in ONNX Runtime on the
CPU. Results from it are labelled "onnxruntime backend emulated". Requests the batcher merged arrive
together: those of equal shapes run as one session call (the real backend's batched execution).
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = [tensor["name"] for tensor in config["output"]]
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def execute(self, requests):
        arrays = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs] for r in requests]
        groups: dict[tuple, list[int]] = {}
        for index, values in enumerate(arrays):
            groups.setdefault(tuple(v.shape[1:] for v in values), []).append(index)
        responses = [None] * len(requests)
        for members in groups.values():
            feed = {name: np.concatenate([arrays[i][k] for i in members]) for k, name in enumerate(self.inputs)}
            results = self.session.run(self.outputs, feed)
            start = 0
            for i in members:
                rows = len(arrays[i][0])
                responses[i] = pb_utils.InferenceResponse(
                    [pb_utils.Tensor(name, value[start:start + rows]) for name, value in zip(self.outputs, results)])
                start += rows
        return responses
