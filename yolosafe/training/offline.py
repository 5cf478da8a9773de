"""What Ultralytics would fetch inside a training, answered without the network where Ultralytics says it is offline.

Two of Ultralytics' steps go to the network before they ask whether it is there:

- **The AMP check.** Rank 0's ``_setup_train`` calls ``check_amp(model)`` on an accelerator: it loads
  ``WEIGHTS_DIR / "yolo26n.pt"`` with ``YOLO(...)``, whose ``safe_download`` calls ``requests.get(...,
  timeout=(30, 300))`` *before* it asks ``is_online()``, only to end offline in its own ``ConnectionError`` branch:
  "checks skipped", AMP on. Every attempt would wait 0-30 s on the network (300 s behind a hanging proxy) while every
  other rank waits in the AMP broadcast. :func:`check_amp` is Ultralytics' own whenever its weights are on disk
  (``yolosafe train --download`` fetches them once, in the input check: :func:`fetch_amp_weights`) or Ultralytics
  says it is online; otherwise it gives Ultralytics' offline answer at once.
- **The font check.** ``check_det_dataset`` (the input check's, every rank's, each validator's) and the label plots
  call ``check_font``, which asks ``is_url(url, check=True)``: a ``requests.head`` of the font's URL (3 s timeouts,
  the name lookup unbounded) whenever Arial is neither in Ultralytics' config folder nor in matplotlib's fonts.
  Under :func:`no_probes` that question is answered as Ultralytics answers it offline (``False``: no font, PIL's
  default one) without the request.

"Offline" is Ultralytics' ``is_online()``: ``YOLO_OFFLINE``, which every attempt's processes have unless the user
set it (``supervisor.child.training_env``), answers it at once, without a lookup. ``training.compat`` checks what
this module assumes of Ultralytics' source (``amp_check_weights``, ``font_check_probe``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from yolosafe.training.scoped import replaced

AMP_WEIGHTS = "yolo26n.pt"  # the model check_amp loads (compat.checks.check_amp_weights reads its source)
AMP_OFF = (False, "fp32", "bf16")  # amp= values for which _setup_train calls no check_amp


def amp_weights() -> Path:
    """Where ``check_amp`` looks for its model: Ultralytics' weights folder (its ``weights_dir`` setting)."""
    from ultralytics import utils

    return Path(utils.WEIGHTS_DIR) / AMP_WEIGHTS


def amp_wanted(amp: Any) -> bool:
    """Whether a training with ``amp=`` runs the AMP check on a GPU (``_setup_train``: not off, not bf16)."""
    return amp not in AMP_OFF


def fetch_amp_weights() -> Path:
    """The AMP check's weights, fetched now if they are not on disk, by Ultralytics' own release download (what
    ``YOLO(amp_weights())`` would do inside the first attempt): ``--download``'s input check, once, before any rank."""
    from ultralytics.utils.downloads import attempt_download_asset

    path = amp_weights()
    if not path.is_file():
        attempt_download_asset(path)
    return path


def check_amp(model: Any, accelerator: bool | None = None,
              ultralytics_check: Callable[[Any], bool] | None = None) -> bool:
    """``ultralytics.utils.checks.check_amp(model)``, unless it would have to download its weights on a machine that
    Ultralytics says is offline: then its own offline answer (AMP on, one warning), without the download.
    ``accelerator``: whether the model's device runs the check (default: as ``check_amp`` decides, not a CPU or MPS);
    the fake GPUs pass ``True`` and, as ``ultralytics_check``, what ``check_amp`` does on a GPU that reaches the
    network (it loads its weights), so their CPU ranks decide as a GPU rank does."""
    from ultralytics.utils import LOGGER, checks, colorstr, is_online

    if accelerator is None:
        accelerator = next(model.parameters()).device.type not in {"cpu", "mps"}
    if accelerator and not amp_weights().is_file() and not is_online():
        LOGGER.warning(f"{colorstr('AMP: ')}checks skipped: offline and {amp_weights()} is not there (yolosafe train "
                       "--download fetches it once). Setting 'amp=True'. If you experience zero-mAP or NaN losses you "
                       "can disable AMP with amp=False.")
        return True
    return (ultralytics_check or checks.check_amp)(model)


@contextlib.contextmanager
def no_probes(online: Callable[[], bool] | None = None) -> Iterator[None]:
    """For the duration: Ultralytics' ``is_url(url, check=True)`` (the font check's probe) answers ``False`` without
    a request while ``online()`` is false (default: Ultralytics' ``is_online()``; the input check passes whether
    ``--download`` asked for the network)."""
    from ultralytics import utils
    from ultralytics.utils import downloads

    original, online = downloads.is_url, online or utils.is_online

    def is_url(url: Any, check: bool = False) -> bool:
        if check and not online():
            return False  # what the probe answers offline once its request has failed
        return original(url, check)

    with replaced(downloads, "is_url", is_url):
        yield
