"""Proves, on a machine without a GPU, that refreekv's CUDA build is whole.

Run by `make cuda-build` with the out-of-tree build first on PYTHONPATH:
the extension imports (so it links against torch's CUDA libraries), it says it
was built with CUDA, every operator has a kernel for the CUDA dispatch key, and
the shared object carries machine code for each requested architecture.
"""

import argparse
import os
import struct
import sys

import torch

import refreekv

OPERATORS = [
    "attention_importance",
    "adaptive_keep_count",
    "mass_keep_count",
    "compact_kv",
    "paged_attention",
    "paged_write",
]


FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


def cubin_architectures(path: str) -> dict[int, int]:
    """Counts the cubins (machine code, entry kind 2) per SM architecture in
    the fat binaries nvcc embedded in a shared object. The toolkit here has no
    cuobjdump, so the fatbin headers are read directly: file header (magic,
    version u16, header size u16, payload size u64), then entries whose header
    holds kind u16 at 0, header size u32 at 4, payload size u64 at 8 and the
    architecture u32 at 28."""
    data = open(path, "rb").read()
    counts: dict[int, int] = {}
    start = data.find(FATBIN_MAGIC)
    while start >= 0:
        _, header_size, payload_size = struct.unpack_from("<HHQ", data, start + 4)
        entry, end = start + header_size, start + header_size + payload_size
        while entry < end:
            kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", data, entry)
            if kind == 2:
                arch = struct.unpack_from("<I", data, entry + 28)[0]
                counts[arch] = counts.get(arch, 0) + 1
            entry += entry_header + entry_size
        start = data.find(FATBIN_MAGIC, end)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", default="7.5;8.0;9.0", help="TORCH_CUDA_ARCH_LIST the build used")
    args = parser.parse_args()

    library = refreekv._native._C.__file__
    print(f"refreekv imported from {os.path.dirname(refreekv.__file__)}")
    print(f"extension {library} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    problems = []
    if not refreekv.built_with_cuda():
        problems.append("refreekv.built_with_cuda() is False")
    for name in OPERATORS:
        for key in ("CPU", "CUDA"):
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"refreekv::{name}", key):
                problems.append(f"refreekv::{name} has no {key} kernel")
    print(f"CUDA kernels registered: {', '.join(OPERATORS)}")

    built = cubin_architectures(library)
    print("device code (cubins per architecture):", ", ".join(f"sm_{a}: {n}" for a, n in sorted(built.items())))
    for arch in args.archs.replace(",", ";").split(";"):
        number = int(arch.strip().removesuffix("+PTX").replace(".", ""))
        if built.get(number, 0) == 0:
            problems.append(f"no sm_{number} machine code in {library}")

    for problem in problems:
        print("FAIL:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
