"""A weight held again in another library's or kernel's layout, beside its PackedInt4.

GemLite, FBGEMM and lowbit's Gluon kernel each read their own layout of the codes. Each builds it
from the PackedInt4 on the weight's first product and keeps it keyed by the qweight tensor (so it
goes when the weight goes). A load_state_dict writes the packed buffers in place, which bumps the
qweight's version; a copy built from an older version is rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from lowbit.kernels.int4_pack import PackedInt4


EVERY_VARIANT = object()
"""`WeightCopies.release`'s default: every variant of the weight."""


class WeightCopies:
    """Copies of packed weights in one other layout; `variant` tells apart copies of one weight
    (GemLite builds one per activation dtype)."""

    def __init__(self) -> None:
        self._held: WeakIdKeyDictionary = WeakIdKeyDictionary()  # qweight -> {variant: (version, copy)}

    def get(self, packed: PackedInt4, build: Callable[[], Any], variant: Hashable = None) -> Any:
        """`packed`'s copy, built by `build()` on first use and after an in-place write."""
        per_variant = self._held.setdefault(packed.qweight, {})
        held = per_variant.get(variant)
        if held is None or held[0] != packed.qweight._version:
            held = (packed.qweight._version, build())
            per_variant[variant] = held
        return held[1]

    def release(self, packed: PackedInt4, variant: Hashable = EVERY_VARIANT) -> None:
        """Drop `packed`'s copy of `variant`, by default every copy of it (the dispatcher chose
        another path for its shape)."""
        if variant is EVERY_VARIANT:
            self._held.pop(packed.qweight, None)
            return
        per_variant = self._held.get(packed.qweight, {})
        per_variant.pop(variant, None)
        if not per_variant:
            self._held.pop(packed.qweight, None)

    def __contains__(self, qweight: torch.Tensor) -> bool:
        return qweight in self._held
