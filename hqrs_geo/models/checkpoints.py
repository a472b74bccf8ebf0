"""Finding and reading checkpoint files safely.

Resolution order for a model's weights: an explicit path; the cache folder
(``$HQRS_GEO_HOME/checkpoints``, default ``~/.cache/hqrs_geo/checkpoints``) under the
registry's file name; a Hugging Face hub download when the model is published there and the
machine is online. Otherwise one line says which file is needed and where to put it.

Reading: safetensors; PyTorch files with ``torch.load(weights_only=True)`` (a file that needs
pickle code execution is refused unless ``trust=True``); OpenAI TorchScript archives.
Wrappers (``{"state_dict": …}``, ``{"model": …}``) and ``module.`` prefixes are removed.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

from ..errors import InputError
from .registry import ModelSpec

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def cache_dir() -> Path:
    """Folder where checkpoints are looked for and downloaded to."""
    home = os.environ.get("HQRS_GEO_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "hqrs_geo") / "checkpoints"


WEIGHTS_FOLDER = Path(__file__).with_name("weights")


def bundled_checkpoint(spec: ModelSpec) -> Path | None:
    """The weights file shipped inside the package for ``spec`` (demo models), if any."""
    if not spec.bundled:
        return None
    path = WEIGHTS_FOLDER / spec.bundled
    if not path.is_file():
        raise InputError(f"{path}: the bundled weights of {spec.name} are missing; reinstall hqrs_geo")
    return path


def cached_checkpoint(spec: ModelSpec) -> Path | None:
    """The registry file name in the cache folder, if it is there."""
    if not spec.filename:
        return None
    path = cache_dir() / spec.filename
    return path if path.is_file() else None


def resolve_checkpoint(spec: ModelSpec, checkpoint: str | None = None, download: bool = True) -> Path:
    """A local checkpoint path for ``spec`` (downloading it when allowed and possible)."""
    if checkpoint:
        path = Path(os.path.abspath(Path(checkpoint).expanduser()))  # stored in run records: absolute
        if path.is_dir():
            raise InputError(f"{checkpoint}: is a folder; give the checkpoint file")
        if not path.is_file():
            raise InputError(f"{checkpoint}: checkpoint file not found; check the path")
        return path
    bundled = bundled_checkpoint(spec)
    if bundled:
        return bundled
    cached = cached_checkpoint(spec)
    if cached:
        return cached
    where = cache_dir() / (spec.filename or f"{spec.key}.pt")
    if spec.hf_repo and spec.hf_file and download and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
        unreachable = hub_unreachable()
        if unreachable:
            raise InputError(
                f"model {spec.name} needs {spec.hf_file} from hf-hub {spec.hf_repo}, and the hub cannot be reached "
                f"({unreachable}); download it elsewhere and put it at {where}, or give its «checkpoint» file")
        try:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.utils import logging as hub_logging

            hub_logging.set_verbosity_error()  # no retry chatter: one line says what failed
            return Path(hf_hub_download(spec.hf_repo, spec.hf_file, cache_dir=str(cache_dir().parent / "hf")))
        except Exception as exc:  # offline, hub down, gated repo…
            reason = type(exc).__name__
            raise InputError(
                f"model {spec.name} needs {spec.hf_file} from hf-hub {spec.hf_repo}, which could not be "
                f"downloaded ({reason}); download it elsewhere and put it at {where}, or give its «checkpoint» file"
            ) from None
    source = f" (hf-hub {spec.hf_repo}, file {spec.hf_file})" if spec.hf_repo else ""
    how = f"{spec.obtain}, then " if spec.obtain and not spec.hf_repo else ""
    raise InputError(
        f"model {spec.name} needs its checkpoint{source}: {how}put it at {where} or give its «checkpoint» file"
    )


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub (``$HF_ENDPOINT``, or the HTTPS proxy in the environment) cannot
    be reached, found in at most ``timeout`` seconds; None when a connection opens. Checked before
    a download, so an offline machine fails at once instead of after the hub client's retries."""
    import socket
    from urllib.parse import urlsplit

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    parts = urlsplit(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}: {exc.strerror or type(exc).__name__}"


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def read_state_dict(path: Path, trust: bool = False) -> dict:
    """Tensors of a checkpoint file as a flat ``{name: tensor}`` dictionary."""
    import torch

    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif _is_torchscript(path):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                if not trust:
                    raise InputError(
                        f"{path}: checkpoint needs pickle code execution to load ({str(exc).splitlines()[0][:120]}); "
                        "only if you trust its source, allow it with «trust_checkpoint»"
                    ) from None
                state = torch.load(path, map_location="cpu", weights_only=False)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                         "is the download complete?") from None
    return unwrap_state_dict(state, path)


def unwrap_state_dict(state, path: Path) -> dict:
    """Remove training wrappers and ``module.`` prefixes; drop OpenAI's non-tensor entries."""
    import torch

    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: holds no model weights (no tensors found); is it a model checkpoint?")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in OPENAI_EXTRA_KEYS and isinstance(v, torch.Tensor)}
