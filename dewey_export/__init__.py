"""dewey_export: PyTorch checkpoint -> a verified export for a target, Triton packaging, and ``dewey-export``.

- ``pipeline``: ``export(source, out, target)``, the one pipeline of every target (checks, staging, the
  fp32 reference, build, parity and the quality gate on the target's candidate, manifest, publish),
  and ``verify_folder`` for ``dewey-export verify``.
- ``onnx_export``, ``openvino_export``, ``trt_build``: the targets (``OnnxTarget``, ``OpenVINOTarget``,
  ``TensorRTTarget``), each a frozen options dataclass with ``check``, ``build`` and ``candidate``;
  TensorRT composes the ONNX build with its engine step (``trt_precision``: its precision plan by
  TensorRT version, plain data).
- ``verify``: the checkpoint's files and hashes, and parity between a candidate and the reference;
  ``gate``: the quality gate of reduced precisions on real text.
- ``contrib_ops``: the ONNX Runtime contrib attention op used by cpu-form graphs.
- ``triton``: packages a finished, passed export as a Triton repository (``triton_model``: its Python model).
- ``cli``: ``dewey-export onnx|openvino|trt|triton|verify``.

It imports ``runtimes`` (the model definition, the forward contract, the manifest, the errors, the gate's
corpus and metrics); ``runtimes`` never imports it, and it never imports ``dewey_train``.
"""
