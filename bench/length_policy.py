"""Where the PyTorch backend's length policy should switch from masked to linear attention.

    python bench/length_policy.py            # ModernBERT-base shape, random weights, 2 threads

For rows of 128..2048 tokens (a batch of 4096 tokens each), the median forward time of the same model
with the masked form (one SDPA call with a boolean mask) and with the linear form (block-local sliding
layers, mask-free global layers). runtimes.attention.SHORT_MASKED_MAX is set from this. Not a test.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import torch

    from runtimes.attention import set_length_policy
    from runtimes.modeling import DeweyModel, backbone_config
    from runtimes.testing import test_config

    torch.set_num_threads(2)
    raw = test_config(50368, hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152,
                      local_attention=128, vector_size=768, max_position_embeddings=8192, initializer_range=0.02)
    torch.manual_seed(0)
    model = DeweyModel(backbone_config(raw)).eval()
    print("| rows x tokens | linear s | masked s |\n|---|---|---|")
    for seq in (128, 256, 512, 1024, 2048):
        batch = 4096 // seq
        ids = torch.randint(5, 50000, (batch, seq))
        mask = torch.ones(batch, seq, dtype=torch.long)
        spans = torch.tensor([[[1, seq - 1]]] * batch)
        times = {}
        for name, limit in (("linear", 0), ("masked", seq)):
            set_length_policy(model.backbone, limit)
            with torch.inference_mode():
                model(ids, mask, spans)
                runs = []
                for _ in range(3):
                    start = time.perf_counter()
                    model(ids, mask, spans)
                    runs.append(time.perf_counter() - start)
            times[name] = statistics.median(runs)
        print(f"| {batch} x {seq} | {times['linear']:.2f} | {times['masked']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
