"""dewey_export: PyTorch checkpoint -> ONNX export folder -> TensorRT engine, and the ``dewey-export`` CLI.

- ``onnx_export``: traces ``runtimes.modeling.DeweyModel`` (the backend contract) to ONNX for a target
  (cpu: ONNX Runtime, gpu: TensorRT / ORT CUDA), verifies it against PyTorch and writes the folder
  atomically with its manifest.
- ``verify``: the checks of an export against its source, used by every path: the checkpoint's files
  and hashes, and parity between a candidate backend and the PyTorch reference.
- ``contrib_ops``: the ONNX Runtime contrib attention op used by cpu-target graphs.
- ``trt_precision``: the builder's precision plan by TensorRT version (plain data).
- ``trt_build``: applies it and ``runtimes.trt_plan`` with the TensorRT API to build and verify an engine.
- ``cli``: ``dewey-export``.

It imports ``runtimes`` for the model definition and the forward contract; ``runtimes`` never imports it.
"""
