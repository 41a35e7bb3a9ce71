"""How much randomness the property, mutation and fuzz tests get.

`make test` (what CI runs) replays the same examples on every run: hypothesis is derandomized and
every seed below is fixed, so a green run stays green. `make fuzz` sets TEST_FUZZ=1 and a fresh
FUZZ_SEED (printed first, and replayed with `FUZZ_SEED=<seed> make fuzz`): new examples, ten times
the budget. A finding becomes a fixed regression case in the test it came from.
"""

import os

from hypothesis import HealthCheck, settings

FUZZING = os.environ.get("TEST_FUZZ") == "1"
SEED = int(os.environ.get("FUZZ_SEED", "0"))
BUDGET_SCALE = 10 if FUZZING else 1


def examples(count: int) -> int:
    """The number of examples to try: `count` in make test, more in make fuzz."""
    return count * BUDGET_SCALE


def seed(fixed: int) -> int:
    """A random generator's seed: `fixed` in make test, derived from FUZZ_SEED in make fuzz."""
    return fixed ^ SEED if FUZZING else fixed


def property_settings(max_examples: int, **extra: object) -> settings:
    """Hypothesis settings of a property test. Not derandomized under make fuzz, whose seed
    (`--hypothesis-seed`) hypothesis prints with any failure."""
    return settings(
        max_examples=examples(max_examples),
        deadline=None,
        derandomize=not FUZZING,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        **extra,  # type: ignore[arg-type]
    )
