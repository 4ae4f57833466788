"""How hard the property tests try: full strength under the `ci` profile, a tenth in the unit layer.

Two hypothesis profiles, both without a deadline (on a shared 2-core machine under ``-n 3`` an
example can take longer than hypothesis's 200 ms, which would fail a correct test):

- ``ci`` (`make test`, hence ``.ci/run``: ``--hypothesis-profile=ci``): `FULL` examples per property
  by default, and each test's own count as written (``@settings(max_examples=examples(1500))``);
- ``unit`` (loaded by tests/conftest.py, so the default of a bare ``pytest`` and of `make unit`):
  `QUICK` by default and each test's own count scaled the same way, never below `QUICK`
  (`examples`), so a quick check still tries every property.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

#: Examples per property under ``ci``: hypothesis's own default.
FULL = 100
#: ... and in the unit layer.
QUICK = 10

for _name, _examples in (("ci", FULL), ("unit", QUICK)):
    settings.register_profile(
        _name, max_examples=_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


def examples(full: int) -> int:
    """A test's example count: `full` under ``ci``, its share under the profile loaded (at least `QUICK`)."""
    return max(min(full, QUICK), full * settings.default.max_examples // FULL)


__all__ = ["FULL", "QUICK", "examples"]
