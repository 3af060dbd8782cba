"""Pretrained backbone weights: timm hub when online, a local file for air-gapped sites, or none.

* ``None``: random init.
* ``"hub"``: timm's default pretrained tag for the architecture, from the Hugging Face hub cache
  when it is already there (no network needed), else downloaded. Offline (``HF_HUB_OFFLINE`` set,
  or the hub host unreachable within a few seconds) is a :class:`WeightsError` at once, not a
  hang on a download and never a silent random init.
* a path: a 3-channel (ImageNet) or 1-channel checkpoint (``.safetensors`` or a ``.pth``/``.bin``
  state_dict, loaded with ``weights_only=True``), given to timm as
  ``pretrained_cfg_overlay=dict(file=...)``. timm's ``load_pretrained`` then adapts the stem
  (``conv1`` / ``conv_stem``) to ``in_chans=1`` with ``adapt_input_conv``, which for one channel
  sums the 3 input-channel kernels (so a gray image x gives what the RGB net gave for (x, x, x)),
  and drops the 1000-class classifier because our model has ``num_classes=0``. Because timm then
  loads with ``strict=False``, we check the key sets ourselves: a file that does not cover the
  backbone (wrong architecture, truncated) is a :class:`WeightsError`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import nn

from export._registry import PretrainedSpec
from export.errors import WeightsError

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0  # how long to wait for the hub host before calling it offline
_TRUE = {"1", "true", "yes", "on"}


def describe(pretrained: PretrainedSpec) -> str:
    """The ``init`` label for a request: ``random``, ``hub`` or the weights file name."""
    if pretrained is None:
        return "random"
    if pretrained == "hub":
        return "hub"
    return Path(pretrained).name


def timm_backbone(name: str, pretrained: PretrainedSpec, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, in_chans=1, num_classes=0)`` with the requested weights."""
    import timm  # lazy: timm + torchvision cost seconds at import, cnn2d never needs them

    kwargs = {"in_chans": 1, "num_classes": 0, **kwargs}
    if pretrained is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained == "hub":
        return _from_hub(name, kwargs)
    return _from_file(name, Path(pretrained), kwargs)


def _from_file(name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    if not path.is_file():
        raise WeightsError(f"{name}: pretrained weights file not found: {path}")
    import timm
    from timm.models import load_state_dict

    try:
        file_keys = set(load_state_dict(str(path)))
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
        )
    except Exception as exc:  # timm/torch raise many kinds: all mean "this file does not fit"
        raise WeightsError(
            f"{name}: cannot load pretrained weights from {path.name}: {exc}"
        ) from exc
    _check_coverage(name, path.name, model, file_keys)
    log.info("%s: pretrained weights from file %s", name, path.name)
    return model


def _check_coverage(name: str, source: str, model: nn.Module, file_keys: set[str]) -> None:
    cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
    classifier = cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    model_keys = set(model.state_dict())
    missing = {k for k in model_keys - file_keys if not k.endswith("num_batches_tracked")}
    unexpected = {
        k for k in file_keys - model_keys if not any(k.startswith(c + ".") for c in classifier)
    }
    if missing or unexpected:
        raise WeightsError(
            f"{name}: weights in {source} do not match the architecture "
            f"({len(missing)} missing, e.g. {sorted(missing)[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {sorted(unexpected)[:3]})"
        )


def _from_hub(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise WeightsError(f"{name}: timm has no pretrained weights for this architecture")
    cached = _hub_cached_file(cfg.hf_hub_id)
    if cached is not None:
        # load the cached copy as a file: no network round trip, same adaptation as the hub path
        model = _from_file(name, cached, kwargs)
        log.info("%s: pretrained weights from the hub cache (%s)", name, cfg.hf_hub_id)
        return model
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        raise WeightsError(
            f"{name}: pretrained='hub' but HF_HUB_OFFLINE is set and {cfg.hf_hub_id or cfg.url} "
            "is not in the local cache; pass a local weights file instead"
        )
    source = (
        (os.environ.get("HF_ENDPOINT") or "https://huggingface.co") if cfg.hf_hub_id else cfg.url
    )
    host = urlparse(str(source or "")).hostname
    if host and not _reachable(host, 443):
        raise WeightsError(
            f"{name}: pretrained='hub' but {host} is unreachable (offline?); "
            "pass a local weights file instead"
        )
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:
        raise WeightsError(f"{name}: downloading pretrained weights failed: {exc}") from exc
    log.info("%s: pretrained weights from the hub (%s)", name, cfg.hf_hub_id or cfg.url)
    return model


def _hub_cached_file(hf_hub_id: str | None) -> Path | None:
    if not hf_hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(hf_hub_id, filename)
        if isinstance(hit, str):
            return Path(hit)
    return None


def _reachable(host: str, port: int, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """TCP connect within ``timeout_s`` (DNS included: run in a thread, a resolver can stall)."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True, name="hub-probe")
    thread.start()
    thread.join(timeout_s)
    return bool(ok)
