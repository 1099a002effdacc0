"""Per-rank timestep sub-sequences for the supported schedulers.

After warmup rank i computes base steps k = 0, s_i, 2 s_i, ...; each moves its band from
t[W+k] to t[W+min(k+s_i, T')]. For the sigma-indexed schedulers (DPM-Solver multistep, Euler,
flow-matching Euler) that is exactly the scheduler run over the sub-list of its own
timesteps/sigmas, so we select entries instead of calling `set_timesteps` again: a stride-1
selection is then the identity and cannot perturb the numerics. Multistep history (DPM-Solver's
`model_outputs`) is carried over, re-sliced to the new band by the caller.

UniPC multistep (Wan's scheduler) indexes its history the same way: the predictor reads
`sigmas[step_index - i]` and the corrector `sigmas[step_index - 1 - i]` for the model outputs of
the steps the scheduler itself took, so the restricted list pairs every history entry with the
sigma it was computed at, and the last, lower-order steps (`lower_order_final`) are the rank's own
last steps. Its latent-shaped state is `model_outputs` and the corrector's `last_sample` (the
sample before the last predictor step); both are re-banded like DPM-Solver's history. Its other
corrector state (`this_order`, `lower_order_nums`, `timestep_list`) is per-rank scalars that
stay valid under a restriction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

SUPPORTED_SCHEDULERS = (DPMSolverMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler,
                        FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)

# Scheduler attributes that hold latent-shaped history (tensors or lists of tensors).
HISTORY_ATTRIBUTES = {DPMSolverMultistepScheduler: ("model_outputs",),
                      UniPCMultistepScheduler: ("model_outputs", "last_sample")}


def check_scheduler_supported(scheduler: object) -> None:
    """One-line error, before any run, for a scheduler we cannot re-time per rank."""
    if not isinstance(scheduler, SUPPORTED_SCHEDULERS):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_SCHEDULERS)
        # ValueError like every other bad-configuration error, although the test is on a type.
        raise ValueError(f"--use_stadi does not support scheduler {type(scheduler).__name__}; use one of {names}")  # noqa: TRY004
    if isinstance(scheduler, DPMSolverMultistepScheduler) and scheduler.config.algorithm_type in ("sde-dpmsolver",
                                                                                                 "sde-dpmsolver++"):
        raise ValueError("--use_stadi needs a deterministic scheduler; DPM-Solver SDE variants draw fresh noise per step")
    if isinstance(scheduler, UniPCMultistepScheduler) and scheduler.config.solver_p is not None:
        raise ValueError("--use_stadi supports UniPCMultistepScheduler without solver_p only (its predictor "
                         "would be another scheduler with its own step index)")


class SubsequenceDDIMScheduler(DDIMScheduler):
    """Deterministic DDIM (eta = 0) whose step goes to the next timestep of its own list.

    Stock DDIM always steps by num_train_timesteps // num_inference_steps, which a strided rank
    must not do.
    """

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             eta: float = 0.0, **kwargs):  # type: ignore[override]
        if eta != 0.0:
            raise ValueError("--use_stadi supports DDIM with eta=0 only")
        position = int((self.timesteps == timestep).nonzero()[0].item())
        prev = int(self.timesteps[position + 1]) if position + 1 < len(self.timesteps) else -1
        alpha_t = self.alphas_cumprod[int(timestep)]
        alpha_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        prediction = self.config.prediction_type
        if prediction == "epsilon":
            x0 = (sample - (1 - alpha_t).sqrt() * model_output) / alpha_t.sqrt()
            eps = model_output
        elif prediction == "v_prediction":
            x0 = alpha_t.sqrt() * sample - (1 - alpha_t).sqrt() * model_output
            eps = alpha_t.sqrt() * model_output + (1 - alpha_t).sqrt() * sample
        else:  # "sample"
            x0 = model_output
            eps = (sample - alpha_t.sqrt() * x0) / (1 - alpha_t).sqrt()
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        prev_sample = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps
        if not kwargs.get("return_dict", True):
            return (prev_sample, x0)
        from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


def to_subsequence_capable(scheduler: object) -> object:
    """The scheduler STADI runs: DDIM becomes `SubsequenceDDIMScheduler`, others are unchanged."""
    check_scheduler_supported(scheduler)
    if isinstance(scheduler, DDIMScheduler) and not isinstance(scheduler, SubsequenceDDIMScheduler):
        return SubsequenceDDIMScheduler.from_config(scheduler.config)
    return scheduler


def rank_schedule_indices(warmup_steps: int, base_steps: Sequence[int]) -> list[int]:
    """Indices into the full timestep list that one rank visits: all warmup steps, then its own."""
    return list(range(warmup_steps)) + [warmup_steps + k for k in base_steps]


def restrict_to_indices(scheduler: object, indices: Sequence[int]) -> None:
    """Re-time `scheduler` in place to visit only `indices` of its current schedule.

    Its step index is kept, so a rank part-way through (end of warmup) continues from there.
    """
    full_timesteps = scheduler.timesteps
    scheduler.timesteps = full_timesteps[list(indices)]
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and not isinstance(scheduler, DDIMScheduler):
        # sigmas has one more entry than timesteps: the final (usually zero) noise level.
        scheduler.sigmas = sigmas[list(indices) + [len(full_timesteps)]]
    scheduler.num_inference_steps = len(indices)


def map_history(scheduler: object, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Apply `transform` (gather + re-slice) to every latent-shaped history tensor."""
    for cls, names in HISTORY_ATTRIBUTES.items():
        if not isinstance(scheduler, cls):
            continue
        for name in names:
            value = getattr(scheduler, name)
            if isinstance(value, list):
                setattr(scheduler, name, [None if v is None else transform(v) for v in value])
            elif isinstance(value, torch.Tensor):
                setattr(scheduler, name, transform(value))
