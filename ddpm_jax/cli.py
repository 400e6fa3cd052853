"""What the commands share: running one, turning user errors into one line, and the friendly flags.

A command module (`main`, `sample`, `evaluate`, `cascade`, `benchmark`, `embed`, `convert`) defines
`define_flags(fv)` and `main(fv, argv)` and ends with `cli.run(define_flags, main)`. Every run gets a fresh
`flags.FlagValues`, so tests can run any command in-process with `run(..., argv=[...])`.

User errors (`validation.UserError`, bad flags, a config file that does not load) print one line,
`error: ...`, and exit with status 2, before anything is compiled or written; anything else keeps
its traceback.

The friendly flags of `sample` and `evaluate` (`--steps`, `--guidance`, ...) are names for config
fields; `SAMPLE_FLAGS` and `EVAL_FLAGS` map one onto the other and `apply_flags` writes them in.

Every command also takes `--coordinator_address`, `--num_processes` and `--process_id` and, run as
one of several processes (given those, or detected: `start_processes`), joins the others with
`jax.distributed.initialize()` before the command does anything; on a single host nothing happens.
"""
from __future__ import annotations

import importlib.util
import logging as py_logging
import os
import sys
import urllib.request
from collections.abc import Callable

from absl import flags, logging
from ml_collections import ConfigDict

from ddpm_jax import defaults
from ddpm_jax.validation import UserError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C

# flag -> (config field, help). Types and defaults come from the field in `defaults.get_config()`.
SAMPLE_FLAGS = {
    "num_samples": ("sampling.num_samples", "Images to make (with --init_images: default one per input)."),
    "batch_size": ("sampling.batch_size", "Images per device call, over all devices (of all processes)."),
    "sampler": ("sampling.sampler", "A name in sampling.SAMPLERS."),
    "steps": ("sampling.steps", "Sampler steps; fewer than diffusion.num_timesteps respaces."),
    "eta": ("sampling.eta", "DDIM noise: 0 deterministic, 1 as ancestral (ddim only)."),
    "timestep_spacing": ("sampling.timestep_spacing", "The timesteps of fewer steps than T: 'even' (0 and T-1 "
                                                      "among them) or 'trailing' (Lin et al. 2024: T/steps - 1 "
                                                      "up to T-1)."),
    "guidance": ("sampling.guidance", "Classifier-free guidance weight w >= 0 (conditional models)."),
    "guidance_t_min": ("sampling.guidance_t_min", "Guide only at model timesteps t >= this (below: w = 0)."),
    "guidance_t_max": ("sampling.guidance_t_max", "Guide only at model timesteps t <= this (above: w = 0)."),
    "guidance_rescale": ("sampling.guidance_rescale", "Guidance rescale phi in [0, 1] (Lin et al. 2024; they use "
                                                      "0.7): the guided output's std brought towards the "
                                                      "conditional one's."),
    "guide_workdir": ("sampling.guide_workdir", "Autoguidance: guide by this run, a weaker version of the model "
                                                "(e.g. the same config trained for fewer steps), not by the null "
                                                "condition."),
    "guide_checkpoint_step": ("sampling.guide_checkpoint_step", "Autoguidance: the guide run's checkpoint of this "
                                                                "step (0: its newest); with --guide_workdir=this run, "
                                                                "an earlier checkpoint guides a later one."),
    "strength": ("sampling.strength", "Image-to-image: noise the inputs to t = strength * T, in [0, 1] (with "
                                      "--mask: edit the masked part from there instead of from noise)."),
    "mask_strength": ("sampling.mask_strength", "--mask=auto (DiffEdit): compare the prompts' noise predictions "
                                                "on the inputs noised to t = mask_strength * T."),
    "mask_threshold": ("sampling.mask_threshold", "--mask=auto: the mask is where the difference is at least "
                                                  "this fraction of its maximum."),
    "mask_draws": ("sampling.mask_draws", "--mask=auto: noise draws averaged."),
    "mask_dilation": ("sampling.mask_dilation", "--mask=auto: grow the mask by this many pixels."),
    "jump_length": ("sampling.jump_length", "Inpainting: RePaint resampling jump length (0: no jumps)."),
    "jump_n_sample": ("sampling.jump_n_sample", "Inpainting: times each jump stretch is sampled."),
    "aug_level": ("sampling.aug_level", "Super-resolution: noise the --low_res input to this level in [0, 1]."),
    "sr_strength": ("sampling.sr_strength", "Super-resolution: 1 starts from noise; below 1 from the upsampled "
                                            "input noised to t = sr_strength * T."),
    "ode_tolerance": ("sampling.ode_tolerance", "--sampler=ode: the ODE solver's relative and absolute tolerance."),
    "seed": ("sampling.seed", "Base random seed."),
    "text_encoder": ("model.text_encoder_path", "Models of precomputed text embeddings: the frozen T5's folder "
                                                "that embeds the prompts (default: the run's)."),
}
EVAL_FLAGS = {
    "num_samples": ("eval.num_samples", "Samples to generate and score."),
    "batch_size": ("eval.batch_size", "Images per device call over all devices (sampling and bpd)."),
    "steps": ("eval.steps", "Sampler steps (0: sampling.steps)."),
    "sampler": ("sampling.sampler", "The sampler of the samples (a name in sampling.SAMPLERS)."),
    "eta": ("sampling.eta", "DDIM noise of the samples: 0 deterministic, 1 as ancestral (ddim only)."),
    "timestep_spacing": ("sampling.timestep_spacing", "The timesteps of the samples' respaced chain: 'even' or "
                                                      "'trailing'."),
    "guidance": ("sampling.guidance", "Classifier-free guidance weight w of the samples (shapes, digits, fid)."),
    "guidance_t_min": ("sampling.guidance_t_min", "Guide the samples only at model timesteps t >= this."),
    "guidance_t_max": ("sampling.guidance_t_max", "Guide the samples only at model timesteps t <= this."),
    "guidance_rescale": ("sampling.guidance_rescale", "Guidance rescale phi of the samples, in [0, 1]."),
    "guide_workdir": ("sampling.guide_workdir", "Autoguidance of the samples: guide by this weaker run of the "
                                                "same model, not by the null condition."),
    "guide_checkpoint_step": ("sampling.guide_checkpoint_step", "Autoguidance of the samples: the guide run's "
                                                                "checkpoint of this step (0: its newest)."),
    "aug_level": ("sampling.aug_level", "sr: the level the low-resolution inputs are noised to, in [0, 1]."),
    "sr_strength": ("sampling.sr_strength", "sr: 1 starts from noise; below 1 from the upsampled input noised "
                                            "to t = sr_strength * T."),
    "seed": ("eval.seed", "Seed of the sampling and bound noise."),
    "bpd_method": ("eval.bpd_method", "bpd: 'vlb' (the paper's variational bound) or 'ode' (the probability-flow "
                                      "ODE, Song et al. 2021)."),
    "ode_tolerance": ("eval.ode_tolerance", "The ODE solver's relative and absolute tolerance: of bpd "
                                            "--bpd_method=ode, and of the samples of --sampler=ode."),
    "ode_sigma_min": ("eval.ode_sigma_min", "bpd --bpd_method=ode: the noise level the ODE starts from (0: the "
                                            "model's smallest)."),
    "split": ("eval.split", "The tfds split (default: 'test' if the dataset has one, else data.split)."),
    "inception_weights": ("eval.inception_weights", "The converted Inception .npz; a .pth is converted "
                                                    "once to the .npz beside it."),
    "reference_stats": ("eval.reference_stats", "Reference statistics .npz (pytorch-fid layout)."),
    "digits_classifier": ("eval.digits_classifier", "The digits classifier .npz (default: fitted and cached)."),
    "clip_model": ("eval.clip_model", "clip: the folder of a CLIP checkpoint in the Hugging Face layout "
                                      "(config.json, model.safetensors, vocab.json, merges.txt)."),
    "text_encoder": ("model.text_encoder_path", "Runs of precomputed text embeddings: the frozen T5's folder that "
                                                "embeds the captions and prompts (default: the run's)."),
}


def _field(config: ConfigDict, path: str):
    section, name = path.split(".")
    return config[section], name


def define_config_flags(fv: flags.FlagValues, mapping: dict) -> None:
    """Defines one flag per entry of `mapping`, typed like its config field, default None (unset)."""
    base = defaults.get_config()
    for flag, (path, help_text) in mapping.items():
        section, name = _field(base, path)
        value = section[name]
        kind = section.get_type(name) if value is None else type(value)
        define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float}.get(
            kind, flags.DEFINE_string)
        define(flag, None, f"{help_text} Sets {path}.", flag_values=fv)


def apply_flags(config: ConfigDict, fv: flags.FlagValues, mapping: dict):
    """Writes every friendly flag that was given into its config field; returns `config`."""
    for flag, (path, _) in mapping.items():
        value = fv[flag].value
        if value is not None:
            section, name = _field(config, path)
            section[name] = float(value) if isinstance(section[name], float) else value
    return config


def no_arguments(args: list[str]) -> None:
    if args:
        raise UserError(f"unexpected arguments {' '.join(args)!r}: every input is a --flag (--help lists them).")


def _check_config_file(argv: list[str]) -> None:
    """A --config file that is missing or does not load is one line, not config_flags' traceback."""
    for arg in argv[1:]:
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
            path = value.partition(":")[0]  # FILE.py:ARG passes ARG to get_config
            if not os.path.isfile(path):
                raise UserError(f"--config={path}: no such file (configs live in configs/, e.g. "
                                "configs/digits.py).")
            try:
                config = defaults.load_config_file(value)
            except UserError as e:  # the config's own check of its argument
                raise UserError(f"--config={value}: {e}") from None
            except Exception as e:  # a user's file: any failure to load it is theirs to fix
                raise UserError(f"--config={value}: cannot load it ({type(e).__name__}: {e}).") from None
            if not hasattr(config, "to_dict"):
                raise UserError(f"--config={value}: get_config() must return an ml_collections.ConfigDict.")
            for override in argv[1:]:
                if override.startswith("--config."):
                    field = override[len("--config."):].split("=", 1)[0]
                    node = config
                    for part in field.split("."):
                        if not hasattr(node, "keys") or part not in node:
                            raise UserError(f"--config.{field}: the config has no field {field} "
                                            "(ddpm_jax/defaults.py lists every field).")
                        node = node[part]


def _drop_orbax_info(record: py_logging.LogRecord) -> bool:
    """Orbax logs every file of every save at INFO; keep its warnings and errors only."""
    return record.levelno >= py_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def define_process_flags(fv: flags.FlagValues) -> None:
    """The flags of a multi-process run, which every command takes (see `start_processes`)."""
    flags.DEFINE_string("coordinator_address", None, "Multi-process runs: HOST:PORT of process 0, where the "
                        "processes meet (default: $JAX_COORDINATOR_ADDRESS or detected).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes run this command "
                         "(default: detected; 1: a single process, nothing detected).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index, 0 .. num_processes - 1 "
                         "(default: detected).", lower_bound=0, flag_values=fv)


# The Cloud TPU VM metadata that lists a slice's hosts (what JAX's own Cloud TPU detection reads).
_TPU_WORKERS_URL = "http://{}/computeMetadata/v1/instance/attributes/worker-network-endpoints"


def _tpu_vm_hosts() -> int:
    """Hosts of the Cloud TPU slice this VM belongs to (0 when this is no TPU VM). Asked only where
    libtpu is installed, since only a TPU VM's metadata server answers."""
    if importlib.util.find_spec("libtpu") is None or "TPU_SKIP_MDS_QUERY" in os.environ:
        return 0
    url = _TPU_WORKERS_URL.format(os.environ.get("GCE_METADATA_IP", "metadata.google.internal"))
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Metadata-Flavor": "Google"}),
                                    timeout=5) as r:
            return len(r.read().decode().split(","))
    except OSError:  # not on Google Cloud, or a TPU VM without the attribute
        return 0


def detected_cluster() -> str | None:
    """The cluster in which this process runs as one of several, judged by the environment from which
    `jax.distributed.initialize()` fills in its arguments; None for a single process.

    Conservative: a cluster counts only where it says there are several processes, so one job in an
    allocation, an sbatch script outside `srun` or a single-host TPU VM starts nothing.
    """
    env = os.environ

    def count(name: str) -> int:
        return int(env[name]) if env.get(name, "").isdigit() else 0

    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    # JAX's SLURM detection reads these; srun sets them (and the step's task count) for each task.
    if (all(name in env for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"))
            and count("SLURM_NTASKS") > 1 and count("SLURM_STEP_NUM_TASKS") > 1):
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    tpu_hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len(tpu_hosts.split(",")) > 1 or count("MEGASCALE_NUM_SLICES") > 1:  # GKE, multislice
        return "Cloud TPU"
    if _tpu_vm_hosts() > 1:  # a TPU VM pod slice, whose hosts are in its metadata only
        return "Cloud TPU pod slice"
    return None


def start_processes(fv: flags.FlagValues) -> None:
    """Joins the other processes with `jax.distributed.initialize` when this command runs as one of
    several: some process flags given (JAX fills in the others from the cluster), or none given and
    `detected_cluster()`. Logs once which process this is; then the others log warnings only."""
    given = {name: fv[name].value for name in ("coordinator_address", "num_processes", "process_id")
             if fv[name].value is not None}
    n, i = given.get("num_processes"), given.get("process_id")
    if n is not None and i is not None and i >= n:
        raise UserError(f"--process_id={i}: must be below --num_processes={n}.")
    if n == 1:
        return
    how = "flags" if given else detected_cluster()
    if how is None:
        return
    import jax

    try:
        jax.distributed.initialize(**given)
    except ValueError as e:  # what was given and detected does not make a cluster
        raise UserError(f"cannot start a multi-process run ({e}): give --coordinator_address=HOST:PORT of "
                        f"process 0, --num_processes and --process_id, or run under SLURM, Open MPI or on a "
                        f"Cloud TPU pod slice, which JAX detects.") from None
    logging.info("Process %d of %d (%s): %d local devices, %d in all.", jax.process_index(), jax.process_count(),
                 how, jax.local_device_count(), jax.device_count())
    if jax.process_index():  # process 0 alone logs progress
        logging.set_verbosity(logging.WARNING)


def fail(message, status: int = EXIT_USAGE) -> None:
    """Prints `error: message` on one line and exits with `status` (2: a usage error)."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(status)


def run(define_flags: Callable[[flags.FlagValues], None], main: Callable, argv: list[str] | None = None):
    """Parses `argv` (default sys.argv) into fresh flags and calls `main(fv, positional_args)`."""
    argv = list(sys.argv if argv is None else argv)
    if not flags.FLAGS.is_parsed():  # absl's logging reads its own flags; keep their defaults
        flags.FLAGS([argv[0]])
    logging.use_absl_handler()  # as absl's app.run: progress and metrics at INFO on stderr
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_drop_orbax_info)
    fv = flags.FlagValues()
    saved_argv, sys.argv = sys.argv, argv  # config_flags reads --config from sys.argv to define overrides
    try:
        _check_config_file(argv)
        define_flags(fv)
        define_process_flags(fv)
        if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
            print(f"{sys.modules[main.__module__].__doc__}\n{fv.get_help()}")
            return None
        rest = fv(argv)
        sys.argv = saved_argv
        start_processes(fv)
        return main(fv, rest[1:])
    except flags.Error as e:
        fail(f"{e}. (--help lists the flags.)")
    except UserError as e:
        fail(e)
    except KeyboardInterrupt:  # what was saved is logged where it was saved (checkpoints, kept batches)
        print("stopped by Ctrl-C.", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        sys.argv = saved_argv
