"""Save and load updates: gradients in safetensors, the observation's metadata as JSON in its header.

The Secret goes to a separate ``<file>.secret.json`` used only for scoring; loading an update never reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from leaklab import __version__
from leaklab.errors import LeaklabError
from leaklab.io import atomic_write, atomic_write_json
from leaklab.models.registry import ModelRef, load_model
from leaklab.threat.observation import Observation, Secret, ThreatFlags

FORMAT = "leaklab-update/1"


def secret_path(path: str | Path) -> Path:
    return Path(f"{path}.secret.json")


def save_update(path: str | Path, obs: Observation, secret: Secret | None = None) -> Path:
    header = {
        "format": FORMAT,
        "leaklab": __version__,
        "model": obs.model.to_dict(),
        "setting": obs.setting,
        "flags": obs.flags.to_dict(),
        "batch_size": obs.batch_size,
        "labels": list(obs.labels) if obs.labels is not None else None,
        "lengths": list(obs.lengths) if obs.lengths is not None else None,
        "meta": obs.meta,
    }
    tensors = {k: v.detach().contiguous() for k, v in obs.gradients.items()}
    out = atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"leaklab": json.dumps(header)}))
    if secret is not None:
        atomic_write_json(
            secret_path(path),
            {
                "format": FORMAT,
                "texts": list(secret.texts),
                "token_ids": [list(t) for t in secret.token_ids],
                "labels": list(secret.labels),
            },
        )
    return out


def load_update(path: str | Path, check_model: bool = True) -> Observation:
    """Read an update; with ``check_model`` every tensor is checked against the model it names."""
    p = Path(path)
    if not p.exists():
        raise LeaklabError(f"update file '{p}' does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(p))
    except Exception as exc:
        raise LeaklabError(f"'{p}' is not a safetensors update file ({exc})") from None
    if "leaklab" not in meta:
        raise LeaklabError(f"'{p}' has no leaklab metadata; write updates with 'leaklab update'")
    try:
        header = json.loads(meta["leaklab"])
        ref = ModelRef.from_dict(header["model"])
        flags = ThreatFlags.from_dict(header["flags"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LeaklabError(f"'{p}': malformed leaklab metadata ({exc})") from None
    if header.get("format") != FORMAT:
        raise LeaklabError(f"'{p}': format {header.get('format')!r}, expected {FORMAT!r}")
    obs = Observation(
        model=ref,
        setting=header["setting"],
        gradients=tensors,
        flags=flags,
        batch_size=header.get("batch_size"),
        labels=tuple(header["labels"]) if header.get("labels") is not None else None,
        lengths=tuple(header["lengths"]) if header.get("lengths") is not None else None,
        meta=header.get("meta") or {},
    )
    if check_model:
        check_against_model(obs)
    return obs


def check_against_model(obs: Observation, ref: ModelRef | None = None) -> None:
    """Every shared tensor must exist in the model (``ref``, default the one the update names) with the
    same shape; the first mismatch is named with both shapes."""
    ref = ref or obs.model
    params = dict(_shared_model(ref, obs.meta).named_parameters())
    for name, tensor in obs.gradients.items():
        if name not in params:
            raise LeaklabError(
                f"update tensor '{name}' (shape {tuple(tensor.shape)}) is not a parameter of "
                f"model '{ref.name}' (the update was made for '{obs.model.name}')"
            )
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise LeaklabError(
                f"update tensor '{name}' has shape {tuple(tensor.shape)} but model '{ref.name}' "
                f"has {tuple(params[name].shape)} (the update was made for '{obs.model.name}')"
            )
        if tensor.dtype != torch.float32:
            raise LeaklabError(f"update tensor '{name}' is {tensor.dtype}, expected float32")


def _shared_model(ref: ModelRef, meta: dict):
    """The model whose parameters the update names: the LoRA-adapted model when the meta records one."""
    if "lora" in meta:
        from leaklab.threat.lora import lora_model

        return lora_model(ref, meta["lora"])
    return load_model(ref).model


def load_secret(path: str | Path) -> Secret | None:
    sp = secret_path(path)
    if not sp.exists():
        return None
    data = json.loads(sp.read_text(encoding="utf-8"))
    return Secret(tuple(data["texts"]), tuple(tuple(t) for t in data["token_ids"]), tuple(data["labels"]))
