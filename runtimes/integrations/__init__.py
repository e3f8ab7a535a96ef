"""Adapters for the libraries people build retrieval with: LangChain, LlamaIndex and MTEB.

Each adapter is a thin layer over one ``runtimes.Encoder``, so it works on every backend (torch, onnx,
openvino, trt) with the Encoder's prompts, batching and late chunking. Importing this package imports
none of the libraries; each submodule imports its own, and says which extra to install when it is
missing:

- ``runtimes.integrations.langchain`` (``pip install 'dewey[langchain]'``): ``DeweyEmbeddings`` and
  ``LateChunkTransformer``;
- ``runtimes.integrations.llamaindex`` (``pip install 'dewey[llamaindex]'``): ``DeweyEmbedding`` and
  ``LateChunkNodeParser``;
- ``runtimes.integrations.mteb`` (``pip install 'dewey[mteb]'``): ``DeweyMTEBModel`` and
  ``DeweyMTEBMultiVector``.
"""
