"""Checkpoints: weights as safetensors, trainer state with torch.save, configs as JSON.

    <run>/checkpoints/
        step-00000400/        one directory per kept checkpoint
            model.safetensors   weights; the output head tied to the embedding is stored once
                                (a sharded run: dcp/, weights and optimizer, memlm.train.sharded_checkpoint)
            trainer.pt          optimizer, step / token / time counters, each rank's data-loader and RNG state
            config.json         {"model": ..., "train": ..., "data": ...}
            tokenizer.json      a non-byte tokenizer (bpe:N, hf:PATH; memlm.data.tokenizers), also in the run directory
            manifest.json       the SHA-256 of each file above, checked before the file is read
        latest -> step-00000400 symbolic links, each replaced atomically
        best -> step-00000300

A save writes a fresh temporary directory, renames it to its step name (a new name, so no
existing checkpoint is touched) and then points `latest` (and `best`) at it with
`os.replace` of a new link. A crash at any moment leaves every link pointing at a complete
checkpoint; the next save removes the leftovers and the directories no link points at.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from memlm.config import ModelConfig, upgrade
from memlm.fileio import fsync_path, sha256_file
from memlm.data import VOCAB_SIZE, ByteTokenizer, DataError
from memlm.data.tokenizers import TOKENIZER_FILE, Tokenizer, check_vocab, load_tokenizer as read_tokenizer
from memlm.model import LanguageModel

WEIGHTS, TRAINER, CONFIG, MANIFEST = "model.safetensors", "trainer.pt", "config.json", "manifest.json"
SHARDED = "dcp"
"""The directory of a sharded (FSDP) run's weights and optimizer state in place of WEIGHTS
(memlm.train.sharded_checkpoint)."""
CHECKPOINTS = "checkpoints"


class CheckpointError(Exception):
    """A missing or unreadable run directory or checkpoint (a one-line message for the user)."""


def save(root: str | Path, step: int, model: nn.Module, trainer_state: dict[str, Any],
         config: dict[str, Any], pointers: tuple[str, ...] = ("latest",), files: dict[str, bytes] | None = None) -> Path:
    """Write the checkpoint of `step` under `root` and point each name in `pointers` at it.
    files: more files of the checkpoint, name -> contents (the tokenizer.json of a non-byte tokenizer)."""
    root, final = Path(root), Path(root) / f"step-{step:08d}"
    if saved_already(final, pointers):
        return final
    tmp = staging(final)
    try:
        tmp.mkdir()
        try:
            safetensors.torch.save_model(model, str(tmp / WEIGHTS), metadata={"step": str(step)})
        except safetensors.SafetensorError as e:  # its I/O errors (a full disk) as the OSError they are
            raise OSError(errno.EIO, str(e).split("I/O error: ")[-1].split(" (os error")[0]) from e
        commit(tmp, final, trainer_state, config, files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(final, pointers)
    return final


def saved_already(final: Path, pointers: tuple[str, ...]) -> bool:
    """Whether the checkpoint directory `final` exists and a link points at it (this very state is
    saved already); then point `pointers` at it too. Creates the checkpoints directory."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    if final.exists() and final.name in _targets(root):
        publish(final, pointers)
        return True
    return False


def staging(final: Path) -> Path:
    """A fresh temporary directory name beside `final` to write its checkpoint in."""
    return final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"


def commit(tmp: Path, final: Path, trainer_state: dict[str, Any], config: dict[str, Any],
           files: dict[str, bytes] | None = None) -> None:
    """Add the trainer state, the configs, `files` (name -> contents) and the manifest (the SHA-256
    of every file, those in subdirectories included) to the weights in `tmp`, sync it all and
    rename it to `final`."""
    torch.save(trainer_state, tmp / TRAINER)
    (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    for name, contents in (files or {}).items():
        (tmp / name).write_bytes(contents)
    paths = sorted(p for p in tmp.rglob("*") if p.is_file())
    files = {p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths}
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n")
    for path in [*tmp.rglob("*"), tmp]:
        fsync_path(path)
    if final.exists():  # an unreferenced leftover of a crashed run
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(final.parent)


def publish(final: Path, pointers: tuple[str, ...]) -> None:
    """Point each link in `pointers` at the checkpoint `final`; remove what no link points at."""
    for name in pointers:
        _point(final.parent / name, final.name)
    _prune(final.parent)


def _point(link: Path, target: str) -> None:
    """Make `link` a symbolic link to `target` atomically (a new link renamed over the old)."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _targets(root: Path) -> set[str]:
    """Names of the checkpoint directories some link (`latest`, `best`) points at."""
    return {os.readlink(p) for p in root.iterdir() if p.is_symlink() and not p.name.startswith(".")}


def remove_leftovers(root: str | Path) -> None:
    """Remove what crashed saves left under a checkpoints directory (and unreferenced checkpoints)."""
    _prune(Path(root))


def _prune(root: Path) -> None:
    """Remove checkpoints no link points at and temporary leftovers of crashed saves."""
    keep = _targets(root)
    for path in root.iterdir():
        if path.is_symlink():
            if path.name.startswith("."):  # a link a crash left before renaming it into place
                path.unlink()
        elif (path.name.startswith("step-") and path.name not in keep) or path.name.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)


# ----- reading ------------------------------------------------------------------------

def find(path: str | Path, pointer: str = "latest") -> Path:
    """The checkpoint directory named by `path`: a checkpoint directory itself, or a run
    directory (its checkpoints/<pointer>). Raises CheckpointError when there is none."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such run directory or checkpoint: {path}")
    candidates = [path, path / pointer, path / CHECKPOINTS / pointer]
    for candidate in candidates:
        if ((candidate / WEIGHTS).is_file() or is_sharded(candidate)) and (candidate / CONFIG).is_file():
            return candidate.resolve()
    raise CheckpointError(f"no checkpoint in {path} (expected {WEIGHTS} or {SHARDED}/, and {CONFIG}, there or in "
                          f"{CHECKPOINTS}/{pointer}/)")


def is_sharded(checkpoint: str | Path) -> bool:
    """Whether a checkpoint directory holds a sharded run's distributed checkpoint (dcp/)."""
    return (Path(checkpoint) / SHARDED / ".metadata").is_file()


def verify(checkpoint: str | Path, name: str) -> Path:
    """The path of file `name` of a checkpoint, after checking it against the checkpoint's manifest
    (checkpoints written before manifests existed are read unchecked)."""
    file = Path(checkpoint) / name
    manifest = Path(checkpoint) / MANIFEST
    if not manifest.is_file():
        return file
    try:
        expected = json.loads(manifest.read_text())["files"][name]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the manifest {manifest}: {e}") from None
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    if file.stat().st_size != expected["bytes"] or sha256_file(file) != expected["sha256"]:
        raise CheckpointError(f"{file} is corrupt: its size or SHA-256 differs from {manifest}")
    return file


def read_config(checkpoint: str | Path) -> dict[str, Any]:
    """The {"model", "train", "data"} dict saved with a checkpoint."""
    verify(checkpoint, CONFIG)
    try:
        return json.loads((Path(checkpoint) / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {Path(checkpoint) / CONFIG}: {e}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu",
               eval_multiplier: float | None = None) -> tuple[LanguageModel, dict[str, Any]]:
    """The model of a run directory or checkpoint (in eval mode), and its saved configs.

    eval_multiplier: replaces the saved `memory.xl.eval_multiplier` (memory lengths in evaluation mode
    are the trained ones times this; it changes no weight, so any trained model can take it)."""
    checkpoint = find(path)
    config = read_config(checkpoint)
    model_config = ModelConfig.from_dict(config["model"])
    if eval_multiplier is not None:
        model_config.memory.xl.eval_multiplier = eval_multiplier
        model_config.validate()
    model = LanguageModel(model_config)
    load_weights(model, checkpoint, device)
    return model.to(device).eval(), config


def load_tokenizer(path: str | Path, config: dict[str, Any] | None = None) -> Tokenizer:
    """The tokenizer a run directory or checkpoint was trained with (bytes unless its config names
    another: then its tokenizer.json, from the checkpoint or else its run directory, checked by
    SHA-256). CheckpointError when it is missing or its vocabulary differs from the model's."""
    found = find(path)
    config = config if config is not None else read_config(found)
    described = (config.get("data") or {}).get("tokenizer")
    if not described or described.get("kind", "byte") == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
    else:
        name = described.get("file", TOKENIZER_FILE)
        where = next((d for d in (found, found.parent.parent) if (d / name).is_file()), None)
        if where is None:
            raise CheckpointError(f"{found} was trained with the tokenizer {described.get('spec', described['kind'])} "
                                  f"but its {name} is neither there nor in its run directory {found.parent.parent}")
        try:
            tokenizer = read_tokenizer(where, described)
        except DataError as e:
            raise CheckpointError(str(e)) from None
    vocab = (config.get("model") or {}).get("vocab_size", VOCAB_SIZE)
    try:
        check_vocab(tokenizer, vocab, str(found))
    except DataError as e:
        raise CheckpointError(str(e)) from None
    return tokenizer


def load_weights(model: nn.Module, checkpoint: str | Path, device: str | torch.device = "cpu") -> None:
    """Load a checkpoint's weights into `model` (which must have the same architecture). A sharded
    run's checkpoint loads into any model, sharded or whole (collective under a process group)."""
    if is_sharded(checkpoint):
        from memlm.train import sharded_checkpoint
        sharded_checkpoint.load(checkpoint, model)
        return
    file = verify(checkpoint, WEIGHTS)
    try:
        safetensors.torch.load_model(model, str(file), strict=True, device=str(device))
    except (OSError, RuntimeError, safetensors.SafetensorError) as e:
        raise CheckpointError(f"cannot load weights from {file}: {str(e).splitlines()[0]}") from None


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The trainer state saved with a checkpoint (tensors on the CPU)."""
    file = verify(checkpoint, TRAINER)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise CheckpointError(f"cannot load trainer state from {file}: {str(e).splitlines()[0]}") from None


def check_same_model(run: Path, found: Path, saved: dict[str, Any]) -> None:
    """Refuse a checkpoint whose model differs from the one the run directory records (a checkpoint
    of another run put in place), before anything of the run is touched."""
    recorded = run / CONFIG
    if not recorded.is_file():
        return
    try:
        model = json.loads(recorded.read_text())["model"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read the run's model from {recorded}: {e}") from None
    model, other = upgrade(model), upgrade(saved.get("model") or {})  # either may predate the memory sections
    if model != other:
        fields = sorted(_differing_fields(model, other))
        raise CheckpointError(
            f"{found} holds another model than the run {run} (differs in {', '.join(fields[:5])}"
            f"{', ...' if len(fields) > 5 else ''}): not resuming from it")


def _differing_fields(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differing_fields(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(prefix + key)
    return out
