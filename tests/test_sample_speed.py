"""Optional sampling speed-ups (channels-last, torch.compile, CUDA autocast) on every generator family."""

from __future__ import annotations

import numpy as np
import pytest

from diffaudit.errors import ConfigError
from diffaudit.generators.denoising import DenoisingGenerator, SampleSpeed
from test_generators import BUILDERS  # noqa: I001 (a sibling test module: the one set of tiny builders)

LABELS, SEEDS = np.array([0, 1, 2]), [5, 6, 7]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def gen(request, tmp_path_factory):
    g = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    if not isinstance(g, DenoisingGenerator):
        pytest.skip("not a denoising generator")
    return g


def _images(g, **kw):
    kw.setdefault("num_steps", 4)
    kw.setdefault("sampler", "ddim")
    return g.sample(LABELS, SEEDS, guidance_scale=2.0, **kw).images.astype(np.int16)


def test_channels_last_and_autocast_are_accepted_recorded_and_keep_images(gen) -> None:
    base = _images(gen)
    fast = gen.with_sample_speed(channels_last=True, autocast="bf16")
    assert gen.sample_speed == SampleSpeed()  # the original keeps its settings
    rec = fast.sampling_record()
    assert rec["channels_last"] is True and rec["autocast"] == "bf16"
    assert rec["autocast_active"] is False  # CPU: recorded, not applied
    got = _images(fast)
    assert np.abs(got - base).max() <= 1  # layout only: the same images up to float rounding
    # Image i still depends on seed i only: batching does not change it.
    np.testing.assert_array_equal(_images(fast, batch_size=1), got)


def test_compile_path_runs_on_cpu(gen) -> None:
    # The "eager" backend exercises the torch.compile wiring without minutes of inductor compilation.
    fast = gen.with_sample_speed(compile=True, compile_backend="eager")
    assert fast.sampling_record()["compile"] is True
    assert np.abs(_images(fast, num_steps=2) - _images(gen, num_steps=2)).max() <= 1


def test_bad_autocast_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="autocast 'fp8' is not one of"):
        SampleSpeed(autocast="fp8")
