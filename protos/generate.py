"""Generate the Python stubs (+ .pyi type stubs) of the contract.

    python protos/generate.py [OUT_DIR]     (default: the repository root)

writes OUT_DIR/glmimage/v1/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py from protos/glmimage/v1/*.proto,
so that the contract imports as `glmimage.v1`. The output is generated, never edited by hand.
"""

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent


def generate(out_dir: Path) -> list[Path]:
    sources = sorted(PROTO_ROOT.glob("glmimage/v1/*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        # grpc_tools ships the well-known types (google/protobuf/*.proto)
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(s) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package in (out_dir / "glmimage", out_dir / "glmimage" / "v1"):
        (package / "__init__.py").write_text('"""Generated from protos/ by protos/generate.py."""\n')
    return sources


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent
    for source in generate(out):
        print("generated", source.name)
