"""Argument checks that fail at config time with one line naming the argument, shared by every layer.

>>> check_at_least(1, batch_size=8, max_rows=None)  # None: an optional setting left unset
>>> check_at_least(1, block_size=0)
Traceback (most recent call last):
...
ValueError: block_size must be >= 1, got 0
>>> check_positive(lr=0.0)
Traceback (most recent call last):
...
ValueError: lr must be > 0, got 0.0
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["check_at_least", "check_fraction", "check_one_of", "check_positive", "check_prompt_template"]


def check_at_least(minimum: float, **values: Optional[float]) -> None:
    """Each value (None passes) must be >= `minimum`."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_positive(**values: Optional[float]) -> None:
    """Each value (None passes) must be > 0."""
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def check_fraction(**values: Optional[float]) -> None:
    """Each value (None passes) must be in the open interval (0, 1)."""
    for name, value in values.items():
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}")


def check_one_of(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_prompt_template(prompt_template: Optional[str]) -> None:
    """A prompt template is None or a string with `{text}` where the text goes."""
    if prompt_template is not None and "{text}" not in prompt_template:
        raise ValueError(f"prompt_template must contain '{{text}}', got {prompt_template!r}")


def read_checkpoint(ckpt_path: Any, label: Optional[str] = None) -> dict[str, Any]:
    """The checkpoint at `ckpt_path`, memory-mapped (its tensors are not read); one clear ValueError, starting
    with `label` (default `ckpt_path='<path>'`), when it is missing, truncated or not a Lightning checkpoint."""
    import zipfile
    from pathlib import Path

    label = label or f"ckpt_path={str(ckpt_path)!r}"
    p = Path(str(ckpt_path)).expanduser()
    if not p.is_file():
        raise ValueError(f"{label}: no such file")
    if not zipfile.is_zipfile(p):  # torch.save writes a zip archive; a truncated one has no central directory
        raise ValueError(f"{label}: not a readable checkpoint (truncated, or not written by torch.save); use "
                         "another checkpoint, e.g. an earlier one in the same folder")
    import torch

    try:  # mmap: the tensors are not read, only the structure and hyperparameters
        ckpt = torch.load(p, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means the same to the user
        raise ValueError(f"{label}: not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{label}: not a Lightning checkpoint (no state_dict)")
    return ckpt
