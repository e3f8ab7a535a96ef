"""TensorRT backend: runs ``model.plan`` from a ``dewey-export trt`` folder (TensorRT 10.x / 11.x).

The same forward contract as every backend. The engine holds one optimization profile per length
bucket (runtimes.trt_plan); each call picks the smallest profile that covers its (batch, sequence,
chunks) shape. Device buffers are torch CUDA tensors; execution is ``execute_async_v3`` on a torch
stream. One execution context is shared under a lock, so a backend may be used from several threads
but runs one batch at a time: for concurrent batches load one backend per thread (or use Triton).
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np

from ..config import ModelFileError
from ..export_format import INPUTS, OUTPUTS
from ..trt_plan import ENGINE_FILE, EngineMetadata, check_engine_compatible, select_profile
from ..validation import require_int
from . import contract_inputs


class TensorRTBackend:
    name = "trt"

    def __init__(self, folder: str | Path, device=None, threads: int | None = None):
        import tensorrt as trt
        import torch

        if threads is not None:  # the host side (copies to and from the GPU) runs on torch's pool
            torch.set_num_threads(require_int("threads", threads, 1))
        folder = Path(folder)
        self.metadata = EngineMetadata.read(folder)
        self.device = torch.device("cuda" if device is None else device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"the trt backend needs a CUDA device, got {str(self.device)!r}")
        props = torch.cuda.get_device_properties(self.device)
        self.notes = check_engine_compatible(self.metadata, trt.__version__, props.name, f"{props.major}.{props.minor}")
        for note in self.notes:  # allowed differences (another GPU of the same architecture): said, not hidden
            warnings.warn(f"{folder}: {note}", RuntimeWarning, stacklevel=3)
        plan_path = folder / ENGINE_FILE
        if not plan_path.is_file():
            raise ModelFileError(f"{folder} has no {ENGINE_FILE}; build it with dewey-export trt")
        # TensorRT binds an engine, and the contexts made from it, to the CUDA device that is current when
        # it is deserialized (TensorRT FAQ, "How do I use TensorRT on multiple GPUs?"); the buffers and
        # the stream live on self.device, so everything is made with that device current.
        with torch.cuda.device(self.device):
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            if self.metadata.version_compatible:
                self._runtime.engine_host_code_allowed = True  # version-compatible plans carry host code
            self.engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if self.engine is None:
                raise ModelFileError(f"TensorRT could not deserialize {plan_path}: the file is damaged; rebuild it")
            if self.engine.num_optimization_profiles != len(self.metadata.profiles):
                raise ModelFileError(
                    f"{plan_path} has {self.engine.num_optimization_profiles} profiles but engine.json lists "
                    f"{len(self.metadata.profiles)}: the two files do not belong together; rebuild"
                )
            self.context = self.engine.create_execution_context()
            self._stream = torch.cuda.Stream(device=self.device)
        self._torch = torch
        self._lock = threading.Lock()
        self._active_profile = None
        self.vector_size = int(self.engine.get_tensor_shape("cls")[-1])

    @classmethod
    def from_folder(cls, folder, device=None, dtype=None, threads: int | None = None) -> "TensorRTBackend":
        if dtype is not None:
            raise ValueError("the trt backend runs the precision its engine was built in (engine.json); drop dtype")
        return cls(folder, device=device, threads=threads)

    def __repr__(self) -> str:
        return (f"TensorRTBackend(device={str(self.device)!r}, precision={self.metadata.precision!r}, "
                f"tensorrt={self.metadata.tensorrt_version!r})")

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, span_bounds: np.ndarray):
        batch, seq = input_ids.shape
        # The Encoder packs batches by a token budget; a profile may allow fewer rows at this length.
        limit = self.metadata.profiles[select_profile(self.metadata.profiles, 1, seq, span_bounds.shape[1])].batch[2]
        if batch > limit:
            parts = [self.forward(input_ids[i:i + limit], attention_mask[i:i + limit], span_bounds[i:i + limit])
                     for i in range(0, batch, limit)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return self._run(input_ids, attention_mask, span_bounds)

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray, span_bounds: np.ndarray):
        torch = self._torch
        batch, seq = input_ids.shape
        profile = select_profile(self.metadata.profiles, batch, seq, span_bounds.shape[1])
        arrays = contract_inputs(input_ids, attention_mask, span_bounds)
        # Enqueued with the engine's device current, whichever device the calling thread had selected.
        with self._lock, torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            if profile != self._active_profile:
                self.context.set_optimization_profile_async(profile, self._stream.cuda_stream)
                self._active_profile = profile
            buffers = {}
            for name in INPUTS:
                tensor = torch.from_numpy(arrays[name]).to(self.device, non_blocking=True)
                self.context.set_input_shape(name, tuple(tensor.shape))
                buffers[name] = tensor
            for name in OUTPUTS:
                shape = tuple(self.context.get_tensor_shape(name))
                buffers[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
            for name, tensor in buffers.items():
                self.context.set_tensor_address(name, tensor.data_ptr())
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            self._stream.synchronize()
            return buffers["cls"].cpu().numpy(), buffers["spans"].cpu().numpy()
