"""Real documents: a RunEngine with ophyd.sim devices, run once in the test process (no subprocess).

`simulated_runs` runs four plans and yields every document they emitted, deep-copied: a count (with
the start metadata given), a scan of two detectors, an array detector (an image and an int32 waveform)
and a resource/datum detector. Extra subscribers (a capturing Publisher) see the same documents.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from bluesky import RunEngine
from bluesky import plans as bp
from ophyd.sim import SynSignal, hw

Document = tuple[str, dict[str, Any]]


@contextlib.contextmanager
def simulated_runs(
    save_path: Path, *subscribers: Callable[[str, dict[str, Any]], Any], **metadata: Any
) -> Iterator[list[Document]]:
    """The documents of the four plans (module docstring); the RunEngine's loop is closed afterwards."""
    loop = asyncio.new_event_loop()
    engine = RunEngine({}, loop=loop)
    devices = hw(save_path=str(save_path))
    waveform = SynSignal(func=lambda: np.arange(6, dtype=np.int32).reshape(2, 3), name="waveform")
    documents: list[Document] = []
    engine.subscribe(lambda name, doc: documents.append((name, copy.deepcopy(doc))))
    for subscriber in subscribers:
        engine.subscribe(subscriber)
    try:
        engine(bp.count([devices.det], num=3), **metadata)
        engine(bp.scan([devices.det1, devices.det2], devices.motor, -1, 1, 3))
        engine(bp.count([devices.direct_img, waveform], num=2))
        engine(bp.count([devices.img], num=2))
        yield documents
    finally:
        loop.call_soon_threadsafe(loop.stop)
        engine._th.join(timeout=10)
        loop.close()
