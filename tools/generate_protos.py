"""Regenerate the protobuf/gRPC Python code from proto/ into specpipe/v1/.

Usage: python tools/generate_protos.py [--out DIR]

The generated files are committed; tests/test_protos.py regenerates them into a temporary directory and fails
on any difference, so a .proto change without regeneration never lands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "specpipe" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> None:
    """Writes specpipe/v1/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    package_init = out_dir / "specpipe" / "v1" / "__init__.py"
    package_init.write_text('"""Generated protobuf/gRPC code; regenerate with tools/generate_protos.py."""\n')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="root to write specpipe/v1/ under")
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
