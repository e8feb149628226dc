"""Write an F32 copy of a GGUF file: the same metadata (tokenizer, chat template, hyper-parameters), every
tensor dequantised by the `gguf` package, in the file's own tensor order and row layout. It gives the float
peer of a quantised checkpoint for `graphcap bench --model COPY.gguf --peer llamacpp` (both engines then
read 32-bit weights).

    .venv/bin/python scripts/dequantize_gguf.py SRC.gguf DST.gguf
"""

from __future__ import annotations

import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants


def dequantize_copy(src: str, dst: str) -> None:
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue  # the writer sets the header and the architecture itself; the file type changes
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(0)  # all F32
    for tensor in reader.tensors:
        values = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values, raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    dequantize_copy(sys.argv[1], sys.argv[2])
