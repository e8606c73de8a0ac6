"""Model configuration: a frozen dataclass that fully describes a class-conditional diffusion model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from diffaudit.errors import ConfigError

SAMPLERS = ("ddpm", "ddim", "dpm++")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and noise schedule of a :class:`~diffaudit.models.diffusion.DiffusionModel`.

    ``num_classes = 0`` builds an unconditional model. Conditional models reserve label ``num_classes`` as the
    "null" label used for classifier-free guidance.
    """

    resolution: int = 8
    channels: int = 1
    num_classes: int = 10
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_levels: tuple[bool, ...] = (False, True)
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ConfigError(
                f"attention_levels {self.attention_levels} must have one entry per block "
                f"({len(self.block_out_channels)})"
            )
        downsample = 2 ** (len(self.block_out_channels) - 1)
        if self.resolution % downsample:
            raise ConfigError(
                f"resolution {self.resolution} must be divisible by {downsample} "
                f"for {len(self.block_out_channels)} U-Net levels"
            )
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(
                f"block_out_channels {self.block_out_channels} must be multiples of norm_num_groups "
                f"{self.norm_num_groups}"
            )
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}")
        if self.num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0, got {self.num_classes}")

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def null_label(self) -> int:
        """Label index that means "no class" (classifier-free guidance); only for conditional models."""
        return self.num_classes

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)  # type: ignore[arg-type]
