"""A short soak in every CI run: the same run as `make soak`, for half a minute."""

from __future__ import annotations

from pathlib import Path

import pytest
from system.soak import soak

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_half_a_minute_of_load_faults_and_restarts_breaks_no_promise(
    tmp_path: Path,
) -> None:
    result = await soak(0.5, principals=3, log_dir=tmp_path)
    assert result.passed, "\n".join([result.summary, *result.tally.violations[:30]])
    assert result.faults.postgres_cuts >= 1
    assert result.faults.redis_cuts >= 1
    assert result.faults.restarts >= 2  # one mid-run, one before the final read-back
    assert result.acknowledged > 100
    assert result.verified == result.acknowledged
    assert result.tally.by_code["OK"] > 500
    assert result.tally.flooded["RESOURCE_EXHAUSTED"] > 0
    assert sum(result.tally.fuzzed.values()) > 50
