"""Labels inside a .tflite file, readable back without tlapp.

Two copies, both written by `embed_labels`:
- a Model.metadata entry named "labels": a buffer of UTF-8 lines, one label per line in
  class-index order (`read_tflite_labels` reads it; so does any flatbuffers reader);
- labels.txt as an associated file: a zip archive appended after the flatbuffer, the layout
  tflite_support's MetadataPopulator writes, so `zipfile.ZipFile("model.tflite")` reads it.
Interpreters read the flatbuffer from its start and ignore both.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import flatbuffers

LABELS_ENTRY = "labels"  # the Model.metadata name
LABELS_FILE = "labels.txt"  # the associated file's name in the appended zip
_IDENTIFIER = b"TFL3"


def _schema():
    try:  # the same generated code ships with both
        from ai_edge_litert import schema_py_generated
    except ImportError:
        from tensorflow.lite.python import schema_py_generated
    return schema_py_generated


def _flatbuffer_part(data: bytes) -> bytes:
    """`data` without a zip archive appended after the flatbuffer (if any)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            # zipfile shifts offsets by what precedes the archive: this is absolute
            start = min((info.header_offset for info in archive.infolist()), default=len(data))
    except zipfile.BadZipFile:
        return data
    return data[:start] if data[start:start + 4] == b"PK\x03\x04" else data


def embed_labels(tflite: bytes, labels: list[str]) -> bytes:
    """The .tflite bytes with `labels` as metadata "labels" and as an associated labels.txt
    (replacing earlier ones); the model, its signatures and tensors are unchanged."""
    schema = _schema()
    flatbuffer = _flatbuffer_part(bytes(tflite))
    text = "".join(f"{label}\n" for label in labels).encode("utf-8")
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    model.metadata = model.metadata or []
    model.buffers = model.buffers or []
    buffer = schema.BufferT()
    buffer.data = text
    entry = next((m for m in model.metadata if m.name.decode() == LABELS_ENTRY), None)
    if entry is None:
        entry = schema.MetadataT()
        entry.name = LABELS_ENTRY
        entry.buffer = len(model.buffers)
        model.buffers.append(buffer)
        model.metadata.append(entry)
    else:
        model.buffers[entry.buffer] = buffer
    builder = flatbuffers.Builder(len(flatbuffer) + len(text) + 1024)
    builder.Finish(model.Pack(builder), _IDENTIFIER)
    out = io.BytesIO()
    out.write(builder.Output())
    with zipfile.ZipFile(out, "a") as archive:  # "a" on non-zip data appends an archive
        archive.writestr(LABELS_FILE, text)
    return out.getvalue()


def read_tflite_labels(tflite: str | Path | bytes) -> list[str] | None:
    """The labels in a .tflite file's metadata "labels" (a path or the bytes), or None if
    it has none."""
    data = Path(tflite).read_bytes() if isinstance(tflite, (str, Path)) else bytes(tflite)
    model = _schema().Model.GetRootAsModel(data, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name().decode() == LABELS_ENTRY:
            return bytes(model.Buffers(entry.Buffer()).DataAsNumpy()).decode("utf-8").splitlines()
    return None
