"""Generate the Python code and type stubs for the contract: `python scripts/gen_proto.py OUT_DIR`.

`make proto` writes into src/; tests/test_proto_fresh.py writes into a temporary folder and
compares, so the checked-in code cannot drift from proto/.
"""

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Compile every .proto under proto/ into out_dir (messages, stubs, and .pyi for both)."""
    well_known = resources.files("grpc_tools") / "_proto"
    plugins = Path(sys.executable).parent  # mypy-protobuf's plugins, beside this interpreter
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={plugins / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugins / 'protoc-gen-mypy_grpc'}",
        f"-I{ROOT / 'proto'}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]))
