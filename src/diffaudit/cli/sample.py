"""``diffaudit sample``: sample any generator (our model, an analytic model, a diffusers pipeline) into a run."""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.cli.common import err, user_text

MODEL_HELP = "model or train-run directory, analytic model directory, or diffusers pipeline directory (sd:PATH ok)"
PROMPTS_HELP = "prompts file for a text-to-image pipeline: one prompt a line, or JSONL {prompt, seed}"
DTYPE_HELP = "pipelines: auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16"
SHARD_HELP = (
    "write only shard i/n (0-based) of the requests to OUT/shards/, or auto (SLURM array, Kubernetes "
    "JOB_COMPLETION_INDEX + DIFFAUDIT_SHARD_COUNT, RANK/WORLD_SIZE); then: diffaudit merge OUT"
)


def register(app: typer.Typer) -> None:
    @app.command("sample")
    def sample(
        model: str = typer.Option(..., help=MODEL_HELP),
        out: Path = typer.Option(..., help="run directory to create (samples.npz, grid.png, config.json)"),
        prompts: Path = typer.Option(None, help=PROMPTS_HELP),
        num_images: int = typer.Option(100, min=1, help="images in all, cycling through the chosen conditions"),
        num_per_condition: int = typer.Option(0, min=0, help="> 0: this many images of each chosen condition"),
        labels: str = typer.Option("all", help="all | none | comma-separated condition names or indices"),
        sampler: str = typer.Option("ddim", help="ddpm | ddim | dpm++ | pipeline (a pipeline's own scheduler)"),
        num_steps: int = typer.Option(50, min=1),
        guidance_scale: float = typer.Option(
            None, help="classifier-free guidance (1: none); default: the model's own (SD pipelines 7.5, ours 2.0)"
        ),
        temperature: float = typer.Option(1.0, min=0.0, help="scale of the sampling noise (<1: less diverse)"),
        seed: int = typer.Option(0, min=0, help="image i uses seed SEED + i (per condition: SEED + p*N + j)"),
        batch_size: int = typer.Option(64, min=1),
        guard: Path = typer.Option(None, help="copy-filter index (diffaudit guard build): re-sample blocked outputs"),
        guard_retries: int = typer.Option(5, min=0, help="re-samples allowed per blocked image"),
        watermark: str = typer.Option("none", help="none | sd-v1 (dwtDct 'StableDiffusionV1', needs >= 256 px)"),
        dtype: str = typer.Option("auto", help=DTYPE_HELP),
        autocast: str = typer.Option("none", help="none | fp16 | bf16 autocast of the network (CUDA only; recorded)"),
        channels_last: bool = typer.Option(False, help="channels-last memory format for the network"),
        compile_network: bool = typer.Option(
            False, "--compile", help="torch.compile the network (minutes of compilation; for long GPU runs)"
        ),
        progress: bool = typer.Option(True, help="show a progress bar"),
        shard: str = typer.Option(None, help=SHARD_HELP),
        shards: int = typer.Option(0, min=0, help="run all of N shards with --engine, then merge (0: no shards)"),
        engine: str = typer.Option("local", help="local (this process) | ray (Ray tasks; needs the ray extra)"),
        address: str = typer.Option(None, help="Ray cluster address (auto, ray://HOST:10001); default: a local one"),
        cpus_per_task: float = typer.Option(1.0, min=0.01, help="Ray: CPUs per task (fractions allowed)"),
    ) -> None:
        """Sample images into RUN/samples.npz; image i depends only on its seed and condition, never on the batch."""
        from diffaudit.config import SampleConfig
        from diffaudit.generators import family_of
        from diffaudit.runs import RunDir
        from diffaudit.sampling import SampleRunConfig, run_sample
        from diffaudit.scale.dispatch import ShardOptions, run_sharded
        from diffaudit.scale.engines import sample_stage

        cfg = SampleRunConfig(
            model=model,
            prompts=None if prompts is None else str(prompts),
            labels=labels,
            num_images=num_images,
            num_per_condition=num_per_condition,
            seed=seed,
            sample=SampleConfig(
                sampler=sampler,
                num_steps=num_steps,
                temperature=temperature,
                batch_size=batch_size,
            ),
            guidance_scale=guidance_scale,
            guard=None if guard is None else str(guard),
            guard_retries=guard_retries,
            watermark=watermark,
            dtype=dtype,
            autocast=autocast,
            channels_last=channels_last,
            compile=compile_network,
        )
        cfg.validate()
        family_of(model)  # a bad model path fails before the run directory exists
        sharding = ShardOptions(shard, shards, engine, address, cpus_per_task)
        if sharding.active:
            done = run_sharded(sample_stage(), cfg, out, sharding, show_progress=progress)
            if done.summary is None:
                err.print(
                    f"shard {done.spec.label} in {user_text(done.folder)}; when all {done.spec.count} are done: "
                    f"diffaudit merge {out}"
                )
                return
            s = done.summary
            err.print(
                f"{s['num_images']} images in {s['shards']} shards ({s['ran']} run, {s['skipped']} already finished) "
                f"merged into {user_text(out / 'samples.npz')}"
            )
            return
        with RunDir(out, kind="sample") as run:
            images = run_sample(cfg, run, show_progress=progress)
        guarded = f" (copy filter record: {out / 'guard.json'})" if guard is not None else ""
        err.print(f"{len(images)} images written to {out / 'samples.npz'}; grid {out / 'grid.png'}{guarded}")
