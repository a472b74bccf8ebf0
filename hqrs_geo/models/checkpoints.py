"""Finding and reading checkpoint files safely.

Resolution order for a model's weights: an explicit path; the cache folder
(``$HQRS_GEO_HOME/checkpoints``, default ``~/.cache/hqrs_geo/checkpoints``) under the
registry's file name; an earlier hub download in the hub cache (``$HQRS_GEO_HOME/hf``), also
when offline (``HF_HUB_OFFLINE=1``); a Hugging Face hub download (``$HF_ENDPOINT``) when the
model is published there and the machine is online. A download cut off half-way resumes where
it stopped (a few tries in one call, and again on the next call). An entry that declares a
``sha256`` has the file it resolves to checked against it. Otherwise one line says which file
is needed and where to put it.

Reading: safetensors; PyTorch files with ``torch.load(weights_only=True)`` (a file that needs
pickle code execution is refused unless ``trust=True``); OpenAI TorchScript archives.
Wrappers (``{"state_dict": …}``, ``{"model": …}``) and ``module.`` prefixes are removed.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
import time
import zipfile
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from ..atomic import sha256_file
from ..errors import InputError
from .registry import ModelSpec

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
DOWNLOAD_TRIES = 3  # a connection dropped mid-file is resumed (HTTP Range) this many times in one call

log = logging.getLogger(__name__)


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


def hub_cache_dir() -> Path:
    """Folder of the Hugging Face hub cache that registry downloads go to (``$HQRS_GEO_HOME/hf``)."""
    return cache_dir().parent / "hf"


def hub_offline() -> bool:
    """Whether ``$HF_HUB_OFFLINE`` forbids the hub (the values huggingface_hub itself reads as true)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cached_checkpoint(spec: ModelSpec) -> Path | None:
    """The file an earlier hub download of ``spec`` left in the hub cache, if any (no network)."""
    if not (spec.hf_repo and spec.hf_file):
        return None
    if not (hub_cache_dir() / f"models--{spec.hf_repo.replace('/', '--')}").is_dir():
        return None  # nothing downloaded from this repository: no need to import the hub client
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(spec.hf_repo, spec.hf_file, cache_dir=str(hub_cache_dir()))
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def cached_checkpoint(spec: ModelSpec) -> Path | None:
    """The registry file name in the cache folder, else an earlier hub download, if either is there."""
    if spec.filename:
        path = cache_dir() / spec.filename
        if path.is_file():
            return path
    return hub_cached_checkpoint(spec)


@lru_cache(maxsize=64)
def _sha256_of(path: str, inode: int, size: int, mtime_ns: int, ctime_ns: int) -> str:
    return sha256_file(path)


def checkpoint_sha256(path: Path | str) -> str:
    """sha256 of a checkpoint file, computed once per file version (inode, size, times) when the
    file has not changed for a few seconds (file times are coarse: a file written just now is hashed again)."""
    real = os.path.realpath(path)
    info = os.stat(real)
    if time.time() - max(info.st_mtime, info.st_ctime) < 5:
        return sha256_file(real)
    return _sha256_of(real, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _remove_hub_file(path: Path) -> None:
    """Remove a hub cache entry (the snapshot link and the blob it points at)."""
    blob = Path(os.path.realpath(path))
    for item in (path, blob):
        try:
            item.unlink()
        except OSError:
            pass


def verify_checkpoint(spec: ModelSpec, path: Path, from_hub: bool) -> Path:
    """``path`` when ``spec`` declares no sha256 or the file has it; else a one-line
    :class:`InputError` (a hub download that does not match is removed, so the next try fetches it again)."""
    if not spec.sha256:
        return path
    found = checkpoint_sha256(path)
    if found == spec.sha256.lower():
        return path
    if from_hub:
        _remove_hub_file(path)
        raise InputError(
            f"model {spec.name}: {spec.hf_file} from hf-hub {spec.hf_repo} has sha256 {found[:16]}…, the registry "
            f"expects {spec.sha256[:16]}…; the download was removed: run again to fetch it again, or check the entry")
    raise InputError(
        f"{path}: sha256 {found[:16]}… is not the checkpoint of model {spec.name} (the registry expects "
        f"{spec.sha256[:16]}…); replace the file, or give it as «checkpoint»")


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Network errors after which a download is worth resuming (the hub client's HTTP library's)."""
    found: list[type[BaseException]] = []
    try:
        import requests

        found += [requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError,
                  requests.exceptions.Timeout]
    except ImportError:
        pass
    try:
        import httpx  # huggingface_hub >= 1.0

        found.append(httpx.TransportError)
    except ImportError:
        pass
    return tuple(found)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _partial_bytes(spec: ModelSpec) -> int:
    """Bytes of unfinished downloads (``*.incomplete`` blobs) of ``spec``'s hub repository."""
    assert spec.hf_repo
    blobs = hub_cache_dir() / f"models--{spec.hf_repo.replace('/', '--')}" / "blobs"
    return sum(p.stat().st_size for p in blobs.glob("*.incomplete")) if blobs.is_dir() else 0


def download_from_hub(spec: ModelSpec) -> Path:
    """Download ``spec``'s file from the hub (``$HF_ENDPOINT``) into :func:`hub_cache_dir`.

    A try cut off by the network (or one that ended short: urllib3 1.x does not check the length)
    is resumed from where it stopped, with an HTTP Range request, up to :data:`DOWNLOAD_TRIES` times;
    what is left unfinished is resumed by the next call."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import logging as hub_logging

    assert spec.hf_repo and spec.hf_file
    hub_logging.set_verbosity_error()  # no retry chatter: one line says what failed
    transient = _transient_errors()
    for attempt in range(1, DOWNLOAD_TRIES + 1):
        before = _partial_bytes(spec)
        try:
            return Path(hf_hub_download(spec.hf_repo, spec.hf_file, cache_dir=str(hub_cache_dir())))
        except Exception as exc:
            progressed = _partial_bytes(spec) > before
            if attempt == DOWNLOAD_TRIES or not (progressed or isinstance(exc, transient)):
                raise
            log.warning("download of %s from hf-hub %s cut off (%s); resuming", spec.hf_file, spec.hf_repo,
                        _first_line(exc))
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


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
    if spec.filename and (cache_dir() / spec.filename).is_file():
        return verify_checkpoint(spec, cache_dir() / spec.filename, from_hub=False)
    from_cache = hub_cached_checkpoint(spec)
    if from_cache:
        return verify_checkpoint(spec, from_cache, from_hub=True)
    where = cache_dir() / (spec.filename or f"{spec.key}.pt")
    if spec.hf_repo and spec.hf_file and download and not hub_offline():
        unreachable = hub_unreachable()
        if unreachable:
            raise InputError(
                f"model {spec.name} needs {spec.hf_file} from hf-hub {spec.hf_repo}, and the hub cannot be reached "
                f"({unreachable}); download it elsewhere and put it at {where}, or give its «checkpoint» file")
        try:
            path = download_from_hub(spec)
        except Exception as exc:  # offline, hub down, gated repo…
            raise InputError(
                f"model {spec.name} needs {spec.hf_file} from hf-hub {spec.hf_repo}, which could not be "
                f"downloaded ({_first_line(exc)}); download it elsewhere and put it at {where}, or give its "
                "«checkpoint» file"
            ) from None
        return verify_checkpoint(spec, path, from_hub=True)
    source = f" (hf-hub {spec.hf_repo}, file {spec.hf_file})" if spec.hf_repo else ""
    how = f"{spec.obtain}, then " if spec.obtain and not spec.hf_repo else ""
    raise InputError(
        f"model {spec.name} needs its checkpoint{source}: {how}put it at {where} or give its «checkpoint» file"
    )


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub (``$HF_ENDPOINT``, or the HTTPS proxy in the environment) cannot
    be reached, found in at most ``timeout`` seconds; None when a connection opens. Checked before
    a download, so an offline machine fails at once instead of after the hub client's retries."""
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
