"""The label-dtype rule of SPEC §1.1, shared by both packages.

Any integer dtype is accepted for ``targets``/``labels`` as long as it can hold ``ignore_index``: a dtype that
cannot (``uint8`` labels with ``ignore_index=-100``) would wrap the marker onto a real token id (-100 is 156
in ``uint8``), which would then silently never be trained. That is refused, never guessed. Every accepted
dtype is widened to a signed integer wide enough for its values before the range check, so ``uint16``/
``uint32`` labels are checked as their true values.
"""
from __future__ import annotations

__all__ = ["check_label_dtype_range"]


def check_label_dtype_range(name: str, dtype_name: str, lo: int, hi: int, ignore_index: int) -> None:
    """``ValueError`` naming ``name`` if ``ignore_index`` lies outside the integer dtype's ``[lo, hi]``."""
    if not (lo <= ignore_index <= hi):
        raise ValueError(
            f"{name}: dtype {dtype_name} holds [{lo}, {hi}] and cannot represent ignore_index={ignore_index} "
            f"(it would collide with a token id); pass signed labels (e.g. int64) or an ignore_index in range")
