"""Hugging Face-style checkpoint folders: released Sa2VA, base InternVL and vseg-native ones, read, loaded, written.

- `read`   what a folder is (config.json, shard headers; `Folder`), its architecture against the preset
- `load`   a folder's weights into vseg's model, tensor by tensor onto a meta-built network (`load_sa2va`)
- `write`  vseg-native and official (released-layout) folders, in bounded safetensors shards

The names other packages use are re-exported here.
"""

from vseg.artifacts.folders.load import LoadReport, load_sa2va, load_tensors
from vseg.artifacts.folders.read import (
    INDEX_FILE,
    NATIVE_FORMAT,
    SINGLE_FILE,
    Folder,
    folder_architecture,
    folder_kind,
    merge_architecture,
    read_folder,
)
from vseg.artifacts.folders.write import (
    native_state_dict,
    write_json,
    write_native_folder,
    write_official_folder,
    write_safetensors,
)
from vseg.artifacts.loading import CheckpointError

__all__ = [
    "INDEX_FILE",
    "NATIVE_FORMAT",
    "SINGLE_FILE",
    "CheckpointError",
    "Folder",
    "LoadReport",
    "folder_architecture",
    "folder_kind",
    "load_sa2va",
    "load_tensors",
    "merge_architecture",
    "native_state_dict",
    "read_folder",
    "write_json",
    "write_native_folder",
    "write_official_folder",
    "write_safetensors",
]
