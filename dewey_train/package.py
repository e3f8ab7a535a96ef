"""Copy a trained model folder into the package as the default model, weights in float16.

    python -m dewey_train.package runs/dewey-mini/final [runtimes/models/dewey-mini]

float16 halves the folder (the packaged model must stay under 25 MB); the runtime loads it back into
float32. The copy is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from runtimes.config import CONFIG_FILE
from runtimes.files import staged_folder
from runtimes.modeling import WEIGHTS_FILE

from .trainer import SUMMARY_FILE, TOKENIZER_FILES

MAX_BYTES = 25 * 1024 * 1024
COPIED = (CONFIG_FILE, *TOKENIZER_FILES, SUMMARY_FILE)


def package(source: str | Path, dest: str | Path) -> Path:
    from safetensors.torch import load_file, save_file
    import torch

    source, dest = Path(source), Path(dest)
    with staged_folder(dest) as tmp:
        state = load_file(str(source / WEIGHTS_FILE))
        state = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        for name in COPIED:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        size = sum(p.stat().st_size for p in tmp.iterdir())
        if size > MAX_BYTES:
            raise ValueError(f"the packaged model is {size / 2**20:.1f} MiB, over the {MAX_BYTES / 2**20:.0f} MiB limit")
    return dest


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    from runtimes import DEFAULT_MODEL_DIR

    out = package(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else DEFAULT_MODEL_DIR)
    print(f"{out}: {sum(p.stat().st_size for p in out.iterdir()) / 2**20:.1f} MiB")
