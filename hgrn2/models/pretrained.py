"""Weights in and out of the hgrn2 models: a folder holding ``config.json``, ``model.safetensors`` and, for the
language model, the tokenizer, so that the folder is all a user needs to run the model::

    model.save_pretrained("runs/lm_demo/model", tokenizer="byte")
    model = HGRN2ForCausalLM.from_pretrained("runs/lm_demo/model")  # a local folder, or a Hugging Face Hub id
    tokenizer = datamodules.tokenizer.build_tokenizer(tokenizer_spec("runs/lm_demo/model"))
    ids = model.generate(torch.tensor([tokenizer.encode("def ")]), 100, temperature=0.8, top_k=20)
    print(tokenizer.decode(ids[0]))

``config.json`` names the architecture (the class), its configuration (the ``LMConfig`` / ``LRAConfig`` /
``VisionConfig`` fields), the tokenizer kind and the SHA-256 of the weights file. The
weights are a safetensors file, read without unpickling anything; weights that are tied (the LM's embedding and
output head) are stored once. Checkpoints of flash-linear-attention and of the authors' code are read by
:mod:`hgrn2.models.convert`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "hgrn2"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Files a Hugging Face tokenizer folder holds (any one of them marks the folder as holding a tokenizer).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# architecture (class name) -> (module, config dataclass)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "HGRN2ForCausalLM": ("hgrn2.models.lm", "LMConfig"),
    "LRAClassifier": ("hgrn2.models.lra", "LRAConfig"),
    "HGRN2Vision": ("hgrn2.models.vision", "VisionConfig"),
}
# LMConfig fields that change how a model runs or trains, not what it computes: a checkpoint fits a model that
# differs from it only in these (and in any dropout rate).
RUNTIME_FIELDS = frozenset(
    {"backend", "fused", "gradient_checkpointing", "precise_bound_grad", "init_std", "rescale_residual"}
)


# ------------------------------------------------------------------------------------------ configuration


def model_config(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """(architecture, configuration) of ``model``, as ``config.json`` stores them."""
    architecture = type(model).__name__
    if architecture not in ARCHITECTURES:
        raise ValueError(f"save_pretrained saves the models {sorted(ARCHITECTURES)}, not a {architecture}")
    values = dataclasses.asdict(model.config)
    for name, value in values.items():
        try:
            json.dumps(value)
        except TypeError:
            raise ValueError(
                f"{architecture} config field {name}={value!r} cannot be written to {CONFIG_FILE}; "
                "build the model with plain values (numbers, strings, lists)"
            ) from None
    return architecture, values


def build_model(architecture: str, config: dict[str, Any], source: str = "the config") -> nn.Module:
    """A freshly initialised ``architecture`` built from ``config`` (as ``model_config`` returns it)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{source}: unknown architecture {architecture!r}; expected one of {sorted(ARCHITECTURES)}")
    module_name, config_name = ARCHITECTURES[architecture]
    module = importlib.import_module(module_name)
    cls = getattr(module, architecture)
    config_cls = getattr(module, config_name)
    _check_fields(config, {f.name for f in dataclasses.fields(config_cls)}, config_name, source)
    return cls(config_cls(**config))


def _check_fields(config: dict, known: set[str], name: str, source: str) -> None:
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(
            f"{source}: {name} has no field(s) {unknown} (saved by another version of hgrn2?); "
            f"the fields are {sorted(known)}"
        )


def architecture_differences(config: Any, other: Any) -> dict[str, tuple[Any, Any]]:
    """Fields (name -> (config's, other's)) in which two model configs of one class differ in what they compute:
    runtime fields (``RUNTIME_FIELDS``) and dropout rates are left out."""
    a, b = dataclasses.asdict(config), dataclasses.asdict(other)
    return {
        name: (a.get(name), b.get(name))
        for name in sorted(set(a) | set(b))
        if name not in RUNTIME_FIELDS and "dropout" not in name and a.get(name) != b.get(name)
    }


# ------------------------------------------------------------------------------------------ files


def resolve_folder(source: str | Path) -> Path:
    """A local folder as is; anything else is taken for a Hugging Face Hub id and downloaded (cached)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{source} is a file; give the folder that save_pretrained (or the converter) wrote")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(source)) or str(source).startswith("."):
        raise FileNotFoundError(f"{source}: no such folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{source}: no such folder, and huggingface_hub (pip install hgrn2[data]) is not installed to fetch it "
            "as a Hub id"
        ) from None
    try:
        return Path(snapshot_download(repo_id=str(source)))
    except Exception as error:
        raise FileNotFoundError(
            f"{source}: no such local folder, and downloading it as a Hugging Face Hub id failed "
            f"({type(error).__name__}: {error}); offline, pass the path of a downloaded folder"
        ) from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; a model folder holds {CONFIG_FILE} beside its weights")
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error}); the file is damaged, save or download it again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file on the CPU; a damaged file (or one whose SHA-256 is not the one recorded)
    is a ValueError that names it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise ValueError(
            f"{path}: its SHA-256 is not the one {CONFIG_FILE} records: the file is damaged (a partial copy or "
            "download?) or was replaced; save or download the folder again"
        )
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"{path}: not a readable safetensors file ({error}); it is damaged or truncated, save or download it again"
        ) from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face style folder: ``model.safetensors``, sharded safetensors
    (``model.safetensors.index.json``) or ``pytorch_model.bin`` (read with ``weights_only=True``)."""
    single = folder / WEIGHTS_FILE
    if single.is_file():
        return read_safetensors(single)
    shard_readers = (("model.safetensors.index.json", read_safetensors), ("pytorch_model.bin.index.json", _read_bin))
    for index_name, reader in shard_readers:
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            if not shards:
                raise ValueError(f"{index}: its weight_map names no files")
            weights = {}
            for shard in shards:
                weights.update(reader(folder / shard))
            return weights
    if (folder / "pytorch_model.bin").is_file():
        return _read_bin(folder / "pytorch_model.bin")
    raise FileNotFoundError(
        f"{folder}: no weights; expected {WEIGHTS_FILE}, model.safetensors.index.json or pytorch_model.bin"
    )


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot read it as a PyTorch state dict ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


# ------------------------------------------------------------------------------------------ weights


def tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Names of tensors that share their storage with an earlier entry (tied weights): alias -> first name."""
    first: dict[tuple, str] = {}
    aliases = {}
    for name, tensor in state.items():
        if tensor.numel() == 0:
            continue
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load ``weights`` into ``model`` when every name and shape fits (tied aliases may be left out), else a
    ValueError that names the missing, unexpected and mis-shaped entries."""
    expected = model.state_dict()
    weights = dict(weights)
    for alias, primary in tied_aliases(expected).items():
        if alias not in weights and primary in weights:
            weights[alias] = weights[primary]
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [
        f"{name} {list(weights[name].shape)} (the model's is {list(expected[name].shape)})"
        for name in expected
        if name in weights and weights[name].shape != expected[name].shape
    ]
    if missing or unexpected or shapes:
        problems = [
            f"{label}: {items[:6]}{' ...' if len(items) > 6 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
            if items
        ]
        raise ValueError(
            f"{source}: the weights do not fit the {type(model).__name__} its config describes ({'; '.join(problems)})"
        )
    model.load_state_dict(weights)


# ------------------------------------------------------------------------------------------ tokenizer


def save_tokenizer(tokenizer: Any, folder: Path) -> str | None:
    """Write ``tokenizer`` into ``folder``; returns the kind ``config.json`` records ("byte", "hf" or None).

    ``tokenizer``: None, ``"byte"``, a Hugging Face tokenizer name or path, a tokenizer object with
    ``save_pretrained`` (Hugging Face), or one of ``datamodules.tokenizer``'s, whose ``name`` is such a spec.
    """
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
        return "hf"
    spec = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name", None)
    if not isinstance(spec, str):
        raise ValueError(f"tokenizer must be 'byte' or a HF tokenizer (name, path, object), not {tokenizer!r}")
    if spec == "byte":
        return "byte"
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(f"saving the tokenizer {spec!r} needs transformers (pip install hgrn2[data])") from None
    try:
        AutoTokenizer.from_pretrained(spec).save_pretrained(folder)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"cannot load the tokenizer {spec!r} to save it beside the weights ({type(error).__name__}); pass a local "
            "tokenizer folder, or tokenizer=None to save the weights alone"
        ) from None
    return "hf"


def tokenizer_spec(folder: str | Path) -> str | None:
    """What ``datamodules.tokenizer.build_tokenizer`` takes to rebuild a saved folder's tokenizer: ``"byte"``, the
    folder itself (a Hugging Face tokenizer saved in it), or None when none was saved."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    kind = read_json(config_path).get("tokenizer") if config_path.is_file() else None
    if kind == "byte":
        return "byte"
    if kind == "hf" or any((folder / name).is_file() for name in HF_TOKENIZER_FILES):
        return str(folder)
    return None


# ------------------------------------------------------------------------------------------ the API


def save_pretrained(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` to ``folder``: ``config.json``, ``model.safetensors`` and (LM) the tokenizer files.

    Bound to the models as a method: ``model.save_pretrained(folder, tokenizer="byte")``. ``tokenizer`` is what
    :func:`save_tokenizer` takes. Returns the folder.
    """
    architecture, config = model_config(model)
    if tokenizer is not None and architecture != "HGRN2ForCausalLM":
        raise ValueError(f"a tokenizer is saved with the language model only, not with a {architecture}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    aliases = tied_aliases(state)
    tensors = {name: t.detach().cpu().contiguous() for name, t in state.items() if name not in aliases}
    weights_path = folder / WEIGHTS_FILE
    save_file(tensors, weights_path, metadata={"format": "pt"})
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "config": config,
        "tokenizer": save_tokenizer(tokenizer, folder),
        "weights_sha256": file_sha256(weights_path),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return folder


def load_pretrained(source: str | Path, expected: str | None = None, **overrides) -> nn.Module:
    """The model a ``save_pretrained`` folder (or Hub id) holds, in eval mode on the CPU.

    ``overrides`` change config fields before the model is built, e.g. ``backend="torch"``; ``expected`` is the
    architecture the caller wants (an error names the one found instead).
    """
    folder = resolve_folder(source)
    record = read_json(folder / CONFIG_FILE)
    if record.get("format") != FORMAT:
        hint = " (an fla or authors' checkpoint? see hgrn2.models.convert)" if record.get("model_type") else ""
        raise ValueError(f"{folder / CONFIG_FILE}: not a folder that save_pretrained wrote{hint}")
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{folder}: format version {record['format_version']} is newer than this hgrn2 reads")
    architecture = record.get("architecture")
    if expected is not None and architecture != expected:
        raise ValueError(f"{folder} holds a {architecture}, not a {expected}; use {architecture}.from_pretrained")
    model = build_model(architecture, {**record.get("config", {}), **overrides}, source=str(folder / CONFIG_FILE))
    weights = read_safetensors(folder / WEIGHTS_FILE, record.get("weights_sha256"))
    load_weights(model, weights, str(folder / WEIGHTS_FILE))
    return model.eval()


def from_pretrained(cls: type[nn.Module], source: str | Path, **overrides) -> nn.Module:
    """Bound to the models as a classmethod: ``HGRN2ForCausalLM.from_pretrained(folder_or_hub_id, **overrides)``."""
    return load_pretrained(source, expected=cls.__name__, **overrides)
