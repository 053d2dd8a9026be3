"""How Ray is started and sized: a local instance (token file private, idle workers kept, augmentation
capped by a custom resource) or a joined cluster, and the per-trial resources a local machine can give."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from xray_ray.errors import UserError

DATA_SLOT = "xray_ray_augment"  # the custom resource of local runs' augmentation tasks (see data_slots)


@dataclass(frozen=True)
class RayOptions:
    """Where Ray runs and what each trial asks of it."""

    address: str | None = None  # join this cluster ('auto', host:port); None: a local Ray (or RAY_ADDRESS)
    num_cpus: int | None = None  # CPUs of a local Ray (None: all)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    data_tasks: int = 1  # augmentation tasks each trial keeps in flight

    @property
    def joined(self) -> bool:
        """Whether Ray is a cluster to join (--address or RAY_ADDRESS) rather than a local instance."""
        return bool(self.address or os.environ.get("RAY_ADDRESS"))


def init_ray(opts: RayOptions) -> None:
    """Start a local Ray (token authentication left on) or join a cluster (--address or RAY_ADDRESS)."""
    import ray

    # No worker set-up hook that imports torch: it would load torch into every Ray process,
    # Ray Data's own stats and autoscaling actors included. The first augmentation task warms its worker.
    env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, runtime_env=env, log_to_driver=False)
        except ConnectionError as e:
            raise UserError(
                f"cannot reach the Ray cluster at {address} ({e}); check the address, and that "
                f"RAY_AUTH_MODE=token and the cluster's token are set here."
            ) from None
    else:
        # Keep idle data workers alive between trials: a new trial then reuses a warm worker (torch imported)
        # for its augmentation tasks instead of spawning one (seconds per trial). Ray's default soft limit
        # (one idle worker per CPU) caps how many stay, each holding torch. No warm-up task from the driver:
        # the trials would not reuse that worker but start another.
        os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")
        # No prestarted idle workers: an augmentation task would land on one as readily as on the warm
        # worker and load torch into it as well. Trial workers start on demand.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        os.environ.setdefault("RAY_enable_worker_prestart", "0")
        cpus = opts.num_cpus or os.cpu_count() or 1
        slots = data_slots(opts, cpus)
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=False,
            configure_logging=True,
            logging_level="WARNING",
            resources={DATA_SLOT: slots} if slots else None,
        )
        private_token_file()


@contextmanager
def ray_session(opts: RayOptions) -> Iterator[None]:
    """Ray for one command: started by init_ray and shut down after, or, when this process already runs Ray
    (a caller's ray.init, as in a notebook), that one, used as it is and left running."""
    import ray

    if ray.is_initialized():
        yield
        return
    init_ray(opts)
    try:
        yield
    finally:
        ray.shutdown()


def private_token_file() -> None:
    """Make Ray's token file (~/.ray/auth_token) readable by its owner only; Ray writes it world-readable.

    Ray 2.60 binds its local servers to every interface whatever the node address (see docs/reliability.md):
    the token is what keeps other machines and users out, so it must not be readable by them.
    """
    token = Path.home() / ".ray" / "auth_token"
    for path, mode in ((token.parent, 0o700), (token, 0o600)):
        try:
            if path.exists() and not path.is_symlink() and path.stat().st_uid == os.getuid():
                path.chmod(mode)
        except OSError:  # a read-only home: nothing more can be done here
            pass


def check_local_resources(opts: RayOptions) -> None:
    """Refuse per-trial CPUs or GPUs that the local Ray instance would not have, before anything starts.

    A cluster (--address or RAY_ADDRESS) is checked once joined instead: it may autoscale.
    """
    if opts.joined:
        return
    cpus = opts.num_cpus or os.cpu_count() or 1
    gpus = local_gpus() if opts.gpus_per_trial > 0 else 0
    for flag, what, asked, have in (
        ("--gpus-per-trial", "GPUs", opts.gpus_per_trial, gpus),
        ("--cpus-per-trial", "CPUs", opts.cpus_per_trial, cpus),
    ):
        if asked > have:
            raise UserError(
                f"{flag} {asked:g} asks for more {what} than this machine has ({have:g}); "
                f"lower it, or run on a cluster with --address."
            )


def local_gpus() -> int:
    """GPUs a local ray.init() would detect: Ray's own probe (CUDA_VISIBLE_DEVICES respected)."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        n = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
        return min(n, len(visible)) if visible is not None else n
    except (ImportError, AttributeError):  # pragma: no cover - Ray's private probe moved; torch counts CUDA
        import torch

        return torch.cuda.device_count()


def data_slot() -> str | None:
    """DATA_SLOT where the running Ray declares it (a local run that init_ray capped), else None."""
    import ray

    return DATA_SLOT if ray.cluster_resources().get(DATA_SLOT) else None


def data_slots(opts: RayOptions, cpus: int) -> int | None:
    """Augmentation tasks a local CPU-only search runs at once across all its trials; None: no cap.

    A CPU trial trains many times slower than one core augments (docs/performance.md), so one
    augmentation worker serves two trials; each worker process saved is torch's libraries and heap.
    GPU trials consume far faster, and a cluster's nodes would each need the resource: neither is capped.
    """
    if opts.joined or opts.gpus_per_trial > 0:
        return None
    trials = max(1, int(cpus // max(opts.cpus_per_trial, 1e-9)))
    return max(1, math.ceil(trials * opts.data_tasks / 2))


def trial_slots(opts: RayOptions, wanted: int | None, num_samples: int) -> int:
    """Trials at once on the running Ray: what a local one holds, or on a cluster (which may autoscale)
    `num_samples`; at most `wanted` when given. Refuses per-trial resources a local Ray lacks."""
    import ray

    total_cpus = ray.cluster_resources().get("CPU", 0)
    total_gpus = ray.cluster_resources().get("GPU", 0)
    for what, asked, have in (("GPUs", opts.gpus_per_trial, total_gpus), ("CPUs", opts.cpus_per_trial, total_cpus)):
        if asked > have and not opts.joined:
            raise UserError(
                f"--{what[:3].lower()}s-per-trial {asked:g} asks for more {what} than this machine "
                f"has ({have:g}); lower it, or run on a cluster with --address."
            )
        if asked > have:  # an autoscaling cluster adds nodes once trials ask for them
            print(
                f"[xray_ray] the cluster has {have:g} {what} now; trials wait for the autoscaler to add "
                f"nodes with {asked:g} {what} each",
                flush=True,
            )
    by_cpu = int(total_cpus // opts.cpus_per_trial)
    by_gpu = int(total_gpus // opts.gpus_per_trial) if opts.gpus_per_trial else by_cpu
    # joined to a cluster that may autoscale: what is up now is no limit, the space's setting is
    limit = num_samples if opts.joined else max(1, min(by_cpu, by_gpu))
    return max(1, min(wanted or limit, limit))
