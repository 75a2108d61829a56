"""Save and load updates: gradients in safetensors, the observation's metadata as JSON in its header.

The Secret goes to a separate ``<file>.secret.json`` used only for scoring; loading an update never reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    """Read an update: its header is checked against the schema (types, ranges, internal consistency) and its
    gradients must be finite and not all zero; with ``check_model`` every tensor is checked against the model
    it names. Any problem is one :class:`LeaklabError` line."""
    p = Path(path)
    if not p.exists():
        raise LeaklabError(f"update file '{p}' does not exist")
    if p.is_dir():
        raise LeaklabError(f"update file '{p}' is a directory")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(p))
    except Exception as exc:
        raise LeaklabError(f"'{p}' is not a safetensors update file ({_one_line(exc)})") from None
    if "leaklab" not in meta:
        raise LeaklabError(f"'{p}' has no leaklab metadata; write updates with 'leaklab update'")
    try:
        header = json.loads(meta["leaklab"])
    except json.JSONDecodeError as exc:
        raise LeaklabError(f"'{p}': malformed leaklab metadata ({exc})") from None
    obs = observation_from_header(header, tensors, p)
    check_signal(obs, p)
    if check_model:
        check_against_model(obs)
    return obs


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def observation_from_header(header: Any, tensors: dict[str, torch.Tensor], p: Path) -> Observation:
    """The Observation a header describes, after checking it key by key (see :func:`check_header`)."""
    check_header(header, p)
    try:
        ref = ModelRef.from_dict(header["model"])
        flags = ThreatFlags.from_dict(header["flags"])
        return Observation(
            model=ref,
            setting=header["setting"],
            gradients=tensors,
            flags=flags,
            batch_size=header.get("batch_size"),
            labels=tuple(header["labels"]) if header.get("labels") is not None else None,
            lengths=tuple(header["lengths"]) if header.get("lengths") is not None else None,
            meta=header.get("meta") or {},
        )
    except LeaklabError as exc:
        raise LeaklabError(f"'{p}': {exc}") from None


_REQUIRED = {"format": str, "model": dict, "setting": str, "flags": dict}
_OPTIONAL = {"batch_size": int, "labels": list, "lengths": list, "meta": dict, "leaklab": str}
_MODEL_KEYS = {"name": str, "task": str, "num_labels": int, "init_seed": int}
_FLAG_TYPES = {
    "batch_size_known": bool,
    "labels_known": bool,
    "lengths_known": bool,
    "train_mode": bool,
    "local_steps": int,
    "learning_rate": float,
    "num_clients": int,
}
SETTING_TASK = {"dpo": "next-token", "reward": "classify"}  # settings that fix the model's task


_JSON_NAMES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
}


def _type_ok(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


_NULLABLE = {"batch_size", "labels", "lengths", "learning_rate", "meta"}  # null: not known / not recorded


def _check_keys(data: dict, required: dict[str, type], optional: dict[str, type], where: str) -> None:
    for key in required:
        if key not in data:
            raise LeaklabError(f"{where}: required key '{key}' is missing")
    for key, kind in {**required, **optional}.items():
        if key not in data or (data[key] is None and key in _NULLABLE):
            continue
        if not _type_ok(data[key], kind):
            value = data[key]
            got = "null" if value is None else f"{_JSON_NAMES.get(type(value), type(value).__name__)} {value!r:.40}"
            raise LeaklabError(f"{where}: '{key}' must be {_JSON_NAMES[kind]}, got {got}")


def check_header(header: Any, p: Path) -> None:
    """The update header's schema: required keys and their types, the format, positive counts, a batch size
    that agrees with the recorded labels and lengths, and a task the setting allows."""
    where = f"'{p}': update header"
    if not isinstance(header, dict):
        raise LeaklabError(f"{where} is {_JSON_NAMES.get(type(header), type(header).__name__)}, not an object")
    _check_keys(header, _REQUIRED, _OPTIONAL, where)
    if header["format"] != FORMAT:
        raise LeaklabError(f"'{p}': format {header['format']!r}, expected {FORMAT!r}")
    _check_keys(header["model"], {"name": str}, _MODEL_KEYS, f"{where} 'model'")
    if header["model"].get("num_labels", 1) < 1:
        raise LeaklabError(f"{where}: model num_labels must be at least 1, got {header['model']['num_labels']}")
    _check_keys(header["flags"], {}, _FLAG_TYPES, f"{where} 'flags'")
    batch = header.get("batch_size")
    if batch is not None and batch < 1:
        raise LeaklabError(f"{where}: batch_size must be at least 1, got {batch}")
    texts = expected_texts(batch, header.get("meta") or {}) if batch is not None else None
    for key in ("labels", "lengths"):
        values = header.get(key)
        if values is None:
            continue
        if not all(_type_ok(v, int) for v in values):
            raise LeaklabError(f"{where}: '{key}' must be a list of integers")
        if texts is not None and len(values) != texts:
            raise LeaklabError(f"{where}: {len(values)} {key} for a batch of {texts} texts (batch_size {batch})")
    task = header["model"].get("task", "next-token")
    needed = SETTING_TASK.get(header["setting"])
    if needed is not None and task != needed:
        raise LeaklabError(f"{where}: setting '{header['setting']}' trains a {needed} model, not {task}")


def expected_texts(batch_size: int, meta: dict[str, Any]) -> int:
    """Private texts behind an update of ``batch_size`` (pairs for preference settings paired by label take
    two texts each)."""
    inner = meta.get("inner_meta") if isinstance(meta.get("inner_meta"), dict) else {}
    pairing = meta.get("pairing", inner.get("pairing"))
    return batch_size * (2 if pairing == "label" else 1)


def check_signal(obs: Observation, p: Path) -> None:
    """Gradients must exist, be finite and not all be zero: an all-zero update is refused with its reason
    instead of being attacked into 'nothing recovered'."""
    if not obs.gradients:
        raise LeaklabError(f"'{p}' holds no tensors")
    obs.check_finite()
    if all(not bool(g.any()) for g in obs.gradients.values()):
        raise LeaklabError(
            f"'{p}': every gradient is zero, so the update carries no signal (an empty or corrupted update)"
        )


def check_against_model(obs: Observation, ref: ModelRef | None = None) -> None:
    """Every shared tensor must exist in the model (``ref``, default the one the update names) with the
    same shape; the first mismatch is named with both shapes. A full-model update must also hold the task
    head's gradient (see :func:`_check_head`)."""
    ref = ref or obs.model
    model = _shared_model(ref, obs.meta)
    params = dict(model.named_parameters())
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
    if "lora" not in obs.meta:
        _check_head(obs, ref, list(params), getattr(model, "base_model_prefix", ""))


def _check_head(obs: Observation, ref: ModelRef, names: list[str], prefix: str) -> None:
    """An update that reached the backbone's last parameter passed through the task head, so it must hold
    the head's gradient: one without it was computed for another task (e.g. a next-token update read as
    classify on a model with tied embeddings, where every other tensor matches)."""
    backbone = [n for n in names if prefix and n.startswith(prefix + ".")]
    head = [n for n in names if n not in backbone]
    if head and backbone and backbone[-1] in obs.gradients and not any(n in obs.gradients for n in head):
        raise LeaklabError(
            f"the update holds no gradient of the {ref.task} head of '{ref.name}' ({', '.join(head)}): "
            f"it was not computed for a {ref.task} model"
        )


def _shared_model(ref: ModelRef, meta: dict):
    """The model whose parameters the update names: the LoRA-adapted model when the meta records one."""
    if "lora" in meta:
        from leaklab.threat.lora import lora_model

        return lora_model(ref, meta["lora"])
    return load_model(ref).model


def load_secret(path: str | Path, obs: Observation | None = None) -> Secret | None:
    """The ``.secret.json`` beside an update (None when there is none), checked: valid JSON with ``texts``,
    ``token_ids`` and ``labels`` of one length; with ``obs``, as many texts as its batch size implies."""
    sp = secret_path(path)
    if not sp.exists():
        return None
    if sp.is_dir():
        raise LeaklabError(f"secret file '{sp}' is a directory")
    try:
        data = json.loads(sp.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LeaklabError(f"secret file '{sp}' is not valid JSON ({_one_line(exc)})") from None
    secret = _secret_from(data, sp)
    if obs is not None and obs.batch_size is not None:
        texts = expected_texts(obs.batch_size, obs.meta)
        if len(secret) != texts:
            raise LeaklabError(
                f"secret file '{sp}' holds {len(secret)} texts but the update records a batch of {texts}"
            )
    return secret


def _secret_from(data: Any, sp: Path) -> Secret:
    where = f"secret file '{sp}'"
    if not isinstance(data, dict):
        raise LeaklabError(f"{where} holds {_JSON_NAMES.get(type(data), type(data).__name__)}, not an object")
    _check_keys(data, {"texts": list, "token_ids": list, "labels": list}, {"format": str}, where)
    if data.get("format", FORMAT) != FORMAT:
        raise LeaklabError(f"{where}: format {data['format']!r}, expected {FORMAT!r}")
    texts, ids, labels = data["texts"], data["token_ids"], data["labels"]
    if not all(isinstance(t, str) for t in texts):
        raise LeaklabError(f"{where}: 'texts' must be a list of strings")
    if not all(isinstance(t, list) and all(_type_ok(i, int) for i in t) for t in ids):
        raise LeaklabError(f"{where}: 'token_ids' must be a list of lists of integers")
    if not all(_type_ok(v, int) for v in labels):
        raise LeaklabError(f"{where}: 'labels' must be a list of integers")
    if not texts or not len(texts) == len(ids) == len(labels):
        raise LeaklabError(
            f"{where}: {len(texts)} texts, {len(ids)} token_ids and {len(labels)} labels (need one of each per text)"
        )
    return Secret(tuple(texts), tuple(tuple(t) for t in ids), tuple(labels))
