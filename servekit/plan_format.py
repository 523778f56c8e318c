"""The plan format: the identity of the codebook a plan is written in.

Planner and decoder compute it from the same checkpoint files, so that a decoder can refuse a
plan from an incompatible planner (a mixed-version rollout). It hashes the raw bytes of the VQ
codebook tensor straight from the safetensors file (the decoder never loads the AR model), plus
the codebook size. Reading the safetensors header needs no torch. Each stage exports the format it
writes or reads as `glmimage_plan_format_info{stage, plan_format} 1`, so that a monitor sees a mismatch.
"""

import hashlib
import json
import struct
from pathlib import Path

from prometheus_client import Info

CODEBOOK_TENSOR = "model.vqmodel.quantize.embedding.weight"
AR_FOLDER = "vision_language_encoder"

INFO = Info("glmimage_plan_format", "The plan format a stage writes (planner) or reads (decoder)", ["stage"])


def export(stage: str, fmt: str) -> None:
    """Publishes `fmt` as `stage`'s plan format in the metrics."""
    INFO.labels(stage).info({"plan_format": fmt})


def _tensor_file(model_dir: Path) -> Path:
    folder = model_dir / AR_FOLDER
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded checkpoint: the index names the shard holding the tensor
        return folder / json.loads(index.read_text())["weight_map"][CODEBOOK_TENSOR]
    return folder / "model.safetensors"


def plan_format(model_dir: str | Path) -> str:
    """`glm-image/vq<size>/<first 16 hex of sha256(codebook bytes)>`."""
    path = _tensor_file(Path(model_dir))
    with path.open("rb") as file:
        (header_len,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_len))
        entry = header[CODEBOOK_TENSOR]
        start, end = entry["data_offsets"]
        file.seek(8 + header_len + start)
        digest = hashlib.sha256(file.read(end - start))
    digest.update(json.dumps([entry["dtype"], entry["shape"]]).encode())
    return f"glm-image/vq{entry['shape'][0]}/{digest.hexdigest()[:16]}"
