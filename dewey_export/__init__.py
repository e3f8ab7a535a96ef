"""dewey_export: PyTorch checkpoint -> ONNX export folder -> TensorRT engine, and the ``dewey-export`` CLI.

- ``onnx_export``: traces ``runtimes.modeling.DeweyModel`` (the backend contract) to ONNX for a target
  (cpu: ONNX Runtime, gpu: TensorRT / ORT CUDA), verifies it against PyTorch and writes the folder
  atomically with its manifest.
- ``verify``: parity between a candidate backend and the PyTorch reference, kept apart from execution.
- ``contrib_ops``: the ONNX Runtime contrib attention op used by cpu-target graphs.
- ``trt_build``: applies ``runtimes.trt_plan`` with the TensorRT API to build an engine.
- ``cli``: ``dewey-export``.

It imports ``runtimes`` for the model definition and the forward contract; ``runtimes`` never imports it.
"""
