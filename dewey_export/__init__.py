"""dewey_export: the exporter (PyTorch -> ONNX -> TensorRT) and the ``dewey-export`` CLI.

Not built yet: the ONNX exporter and TensorRT builder arrive with their issues. It imports
``runtimes`` for the model definition and the forward contract; ``runtimes`` never imports it.
"""
