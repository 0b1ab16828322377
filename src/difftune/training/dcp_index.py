"""torch.distributed.checkpoint's index of a sharded state (FSDP2), which torch reads with
plain pickle.load: checked here by an unpickler that builds nothing real and refuses any
name but DCP's records and plain values, before torch reads it."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

DCP_INDEX = re.compile(r"(pytorch_model_fsdp|optimizer)_\d+/\.metadata")
"""torch.distributed.checkpoint's index of a sharded state (FSDP2), which torch reads with
plain pickle.load: checked by `dcp_index_problem` before torch reads it."""
DCP_RECORDS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
}
"""DCP's own records: dataclasses whose state the index sets (BUILD)."""
DCP_VALUES = {
    "torch.distributed.checkpoint.metadata": {"_MEM_FORMAT_ENCODING"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
"""The other names an index may hold: an enum, torch's layout by name, a path, an ordered
dict, and torch.Size and its dtypes (TORCH_VALUES). Called with any arguments, none of
these (nor a record's constructor) runs anything."""
TORCH_VALUES = re.compile(r"Size|bool|bfloat16|(u?int|float|complex)\d+|float8_e\w+")


class _StandIn:
    """Built in place of what the index names while it is checked, keeping the arguments
    and state it is given; `name` says what it stands for."""

    name = ""
    record = False

    def __new__(cls, *args: Any, **kwargs: Any) -> _StandIn:
        made = object.__new__(cls)
        made.args, made.state = args, None
        return made

    def __init__(self, *args: Any) -> None:  # a REDUCE: the constructor's arguments
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _IndexCheck(pickle._Unpickler):  # the Python unpickler, whose opcodes can be overridden
    """Reads an index with a stand-in for each name it allows and refuses any other name,
    and any state set on what is not a fresh DCP record (a class, a dtype, an enum member):
    whatever this accepts, torch's own pickle.load of it builds records and values only."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.made: list[_StandIn] = []

    def find_class(self, module: str, name: str) -> Any:
        record = name in DCP_RECORDS.get(module, ())
        if not (record or name in DCP_VALUES.get(module, ()) or (module == "torch" and TORCH_VALUES.fullmatch(name))):
            raise pickle.UnpicklingError(f"it names {module}.{name}")
        made = self.made

        def new(cls: type, *args: Any, **kwargs: Any) -> _StandIn:
            instance = _StandIn.__new__(cls, *args)
            made.append(instance)
            return instance

        return type(name, (_StandIn,), {"name": name, "record": record, "__new__": new})

    def load_build(self) -> None:
        target = self.stack[-2]
        if isinstance(target, type) or not getattr(target, "record", False):
            raise pickle.UnpicklingError("it sets the state of something other than one of its records")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def dcp_index_problem(path: Path) -> str | None:
    """Why a sharded state's DCP index (FSDP2: pytorch_model_fsdp_N/.metadata,
    optimizer_N/.metadata) may not be read by torch, which unpickles it with no limit on
    what it runs: it must name only DCP's records, and point at data inside its folder."""
    for index in sorted(path.glob("*/.metadata")):
        name = str(index.relative_to(path))
        if not DCP_INDEX.fullmatch(name):
            return f"{name} is a file difftune does not write, and may be a pickle; it was not read"
        problem = _index_problem(index)
        if problem is not None:
            return f"{name} is not an index torch.distributed.checkpoint writes: {problem}; it was not read"
    return None


def _index_problem(index: Path) -> str | None:
    try:
        with open(index, "rb") as file:
            check = _IndexCheck(file)
            check.load()
    except pickle.UnpicklingError as error:
        return str(error)
    except Exception as error:  # noqa: BLE001 (a crafted pickle fails in many ways; each is a refusal)
        return f"it does not read: {type(error).__name__}"
    outside = next((where for where in _data_paths(check.made) if not _plain_name(where)), None)
    return None if outside is None else f"it points at {outside!r}, outside its folder"


def _data_paths(made: list[_StandIn]) -> list[Any]:
    """Every relative_path the index gives, set as state (as DCP writes it) or passed to
    _StorageInfo's constructor: where torch would read a tensor's bytes from."""
    paths = [stand.args[0] for stand in made if stand.name == "_StorageInfo" and stand.args]
    for stand in made:
        state = stand.state[1] if isinstance(stand.state, tuple) and len(stand.state) == 2 else stand.state
        if isinstance(state, dict) and "relative_path" in state:
            paths.append(state["relative_path"])
    return paths


def _plain_name(where: Any) -> bool:
    return isinstance(where, str) and where not in ("", ".", "..") and Path(where).name == where
