"""Router adapter folders, loadable by ``mlx_lm ... --adapter-path`` as they are.

``adapters.safetensors`` holds only the tuned layers' router weights in float32 (and their biases where the
router has one: gpt-oss), under the family's checkpoint names (``model.layers.N.mlp.gate.weight`` for
Qwen3-MoE, ``model.layers.N.mlp.router.weight`` and ``.bias`` for gpt-oss);
``adapter_config.json`` says ``"fine_tune_type": "full"`` (mlx-lm then loads the tensors as
plain weights) and carries a ``"moe_local"`` object: the base model's fingerprint, the tuned
layers, the method and every hyper-parameter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError, first_non_finite
from ..files import atomic_save_numpy_safetensors, atomic_write_text

WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
METRICS_FILE = "metrics.jsonl"


def write_adapter(folder: Path, weights: dict, spec, layers, method: str, hyperparameters: dict) -> None:
    """Write (atomically, file by file) the adapter of the given tuned layers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = {name for i in layers for name in spec.router_tensors(i)}
    if set(weights) != names:
        raise ValueError(f"adapter weights {sorted(weights)} do not match the tuned layers {sorted(layers)}")
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
    if (bad := first_non_finite(tensors)) is not None:
        raise UserError(f"the adapter's {bad} holds NaN or infinite values; it is not written")
    config = {
        "fine_tune_type": "full",
        "moe_local": {
            "fingerprint": spec.fingerprint(layers),
            "layers": [int(i) for i in layers],
            "method": method,
            "hyperparameters": hyperparameters,
        },
    }
    atomic_save_numpy_safetensors(folder / WEIGHTS_FILE, tensors)
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def read_adapter(folder: Path) -> tuple[dict, dict]:
    """(float32 numpy weights keyed by checkpoint names, the adapter_config.json object), every value
    finite; the names are checked against a model with :func:`check_adapter`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"adapter folder not found: {folder}")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise UserError(f"{folder} is not a router adapter (it needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = _read_config(config_path)
    from safetensors.numpy import load_file

    try:
        weights = load_file(str(weights_path))
    except Exception:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{weights_path} is not a readable safetensors file") from None
    for name, array in weights.items():
        if array.dtype != np.float32:
            raise UserError(f"{weights_path}: {name} is {array.dtype}, adapters hold float32")
    if (bad := first_non_finite(weights)) is not None:
        raise UserError(f"{weights_path}: {bad} holds NaN or infinite values")
    return weights, config


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    if (
        not isinstance(config, dict)
        or config.get("fine_tune_type") != "full"
        or not isinstance(config.get("moe_local"), dict)
    ):
        raise UserError(f"{path} is not a moe-local router adapter (no 'moe_local' section)")
    ours = config["moe_local"]
    layers = ours.get("layers")
    if not isinstance(layers, list) or not layers or not all(type(i) is int for i in layers):
        raise UserError(f"{path}: 'moe_local.layers' must list the tuned layers (integers), got {layers!r}")
    if not isinstance(ours.get("fingerprint"), dict):
        raise UserError(f"{path} has no base-model fingerprint ('moe_local.fingerprint'); it cannot be checked")
    return config


def check_adapter(weights: dict, config: dict, spec, folder: Path) -> None:
    """An adapter fits ``spec``: made for this model (its fingerprint), and its tensors are exactly the router
    tensors (each weight, and its bias where the router has one) of the layers it lists: no gate of another
    layer is applied or fused unseen."""
    check_fingerprint(config, spec, folder)
    layers = config["moe_local"]["layers"]
    expected = {name for i in layers for name in spec.router_tensors(i)}
    extra, missing = sorted(set(weights) - expected), sorted(expected - set(weights))
    if extra:
        raise UserError(f"the adapter {folder} holds {extra[0]}, which is not a router of its layers {layers}")
    if missing:
        raise UserError(f"the adapter {folder} lacks {missing[0]} (it lists layers {layers})")


def check_fingerprint(config: dict, spec, folder: Path) -> None:
    """An adapter made for another model is refused, naming the first difference."""
    theirs = config["moe_local"].get("fingerprint")
    layers = config["moe_local"].get("layers", [])
    try:
        ours = spec.fingerprint(layers)
    except UserError:
        ours = None
    if ours != theirs:
        diff = _first_difference(theirs or {}, ours or spec.fingerprint())
        raise UserError(f"the adapter {folder} was made for another model ({diff})")


def _first_difference(theirs: dict, ours: dict) -> str:
    for key in ("family", "hidden_size", "num_layers", "gates"):
        if theirs.get(key) != ours.get(key):
            return f"{key}: adapter {theirs.get(key)}, model {ours.get(key)}"
    return "fingerprints differ"


def apply_adapter(loaded, folder: Path) -> None:
    """Install an adapter's gates on a loaded model (either backend), after checking that it fits."""
    weights, config = read_adapter(folder)
    check_adapter(weights, config, loaded.spec, Path(folder))
    loaded.set_router_weights(weights)
