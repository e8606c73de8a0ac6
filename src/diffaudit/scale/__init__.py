"""Audits at the papers' scale: shards of heavy stages, merging by key, and engines (in process, Ray).

- :mod:`diffaudit.scale.shards`: ``--shard i/n`` / ``auto`` (SLURM, Kubernetes, torchrun), even splits of a work
  list, shard folders written atomically with a manifest, finished shards skipped.
- :mod:`diffaudit.scale.merge`: ``diffaudit merge RUN``: same config and model, exact coverage, merge by key.
- :mod:`diffaudit.scale.engines`: every shard of a stage in this process or as Ray tasks, then merged.

See docs/scale.md.
"""

from diffaudit.scale.shards import ShardSpec, parse_shard, split_even

__all__ = ["ShardSpec", "parse_shard", "split_even"]
