"""ImageNet weights from torchvision and timm, fetched so that no network means a quick, clear error.

Downloads go through the libraries' own caches (``torch.hub.get_dir()`` for torchvision,
the Hugging Face cache for timm), so a file put there by hand is used without any network.
Before downloading, the host is probed with a short timeout: offline, the user gets a
:class:`PretrainedWeightsError` within seconds instead of a hang.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import torch
from torch import nn
from data_prep.errors import WorkbookError

#: Seconds to wait for the weights host before declaring the machine offline.
NETWORK_TIMEOUT_S = 5.0
#: Socket timeout while a download is running, so a stalled transfer fails instead of hanging.
DOWNLOAD_TIMEOUT_S = 60.0
HF_HOST = "huggingface.co"
HTTPS_PORT = 443


class PretrainedWeightsError(WorkbookError, RuntimeError):
    """ImageNet weights could not be fetched or do not fit the model."""


def _offline_message(model: str, source: str, cache: str, reason: object) -> str:
    return (
        f"pretrained weights for {model} could not be downloaded from {source} (no network?): {reason}. "
        f"Use pretrained=False, or download the file on a machine with internet and put it in {cache}."
    )


def probe(host: str, port: int = HTTPS_PORT, timeout: float = NETWORK_TIMEOUT_S) -> None:
    """Open and close a TCP connection to ``host``; raise OSError if that fails within ``timeout``.

    With an HTTPS proxy configured, the proxy is probed instead, because that is what the download
    will talk to.
    """
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname or host, parsed.port or port
    with socket.create_connection((host, port), timeout=timeout):
        pass


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # urllib (used by torch.hub) has no timeout of its own; restore the global default afterwards.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def torchvision_state_dict(weights: Any, model: str) -> dict[str, torch.Tensor]:
    """Return the state dict of torchvision ``weights`` (a ``*_Weights`` enum member) for ``model``.

    Uses the torch hub cache when the file is there; otherwise probes the host and downloads.
    Raises :class:`PretrainedWeightsError` naming the model, the URL and the cache folder when
    offline or when the download fails.
    """
    filename = Path(urlparse(weights.url).path).name
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    if not (cache / filename).is_file():
        host = urlparse(weights.url).hostname or weights.url
        try:
            probe(host)
        except OSError as err:
            raise PretrainedWeightsError(_offline_message(model, weights.url, str(cache), err)) from err
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return weights.get_state_dict(progress=True, check_hash=False)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a truncated file is a RuntimeError
        raise PretrainedWeightsError(_offline_message(model, weights.url, str(cache), err)) from err


def timm_model(name: str, **kwargs: Any) -> nn.Module:
    """Create timm model ``name`` with ImageNet weights (``kwargs`` go to ``timm.create_model``).

    If the Hugging Face cache lacks the file and huggingface.co cannot be reached, raise
    :class:`PretrainedWeightsError` at once rather than letting the hub client retry.
    """
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    cached = repo is not None and any(
        isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin")
    )
    source, cache = f"{HF_HOST}/{repo}", "the Hugging Face cache (HF_HUB_CACHE)"
    if not cached:
        try:
            probe(HF_HOST)
        except OSError as err:
            raise PretrainedWeightsError(_offline_message(name, source, cache, err)) from err
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError) as err:
        raise PretrainedWeightsError(_offline_message(name, source, cache, err)) from err


def adapt_input_weight(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Turn an RGB first-conv ``weight`` (O, 3, kH, kW) into one for ``in_chans`` input channels.

    One channel: the sum over RGB (a grey image gives the same activations as its RGB copy).
    More channels: RGB repeated and scaled by 3 / in_chans so activations keep their magnitude.
    """
    if weight.shape[1] == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def replace_input_conv(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    """Return a copy of ``conv`` taking ``in_chans`` channels, its weights adapted (or ``conv`` itself)."""
    if conv.in_channels == in_chans:
        return conv
    new = nn.Conv2d(
        in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(adapt_input_weight(conv.weight, in_chans))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new
