"""STADI in xDiT's model runner (`xfuser.runner`, behind the `xdit` command).

A registered runner model (`xFuserModel` subclass in xfuser's `MODEL_REGISTRY`) is turned into
its STADI form by subclassing it (`stadi_runner_model`): the model's own loading code runs
unchanged (`ModelLoader`, dtypes, text-encoder planning) and only the pipeline it returns is
wrapped into the family's STADI twin; the model's `_run_pipe` then calls the twin with the same
arguments. Capabilities are declared where xDiT declares them: the STADI form's
`ModelCapabilities` switch off the degrees and features STADI cannot combine with, so the
runner's own `_validate_config` refuses them too.

The CLI hook (`cli_hook.py`) routes the runner here: `add_runner_args` gains the STADI flags,
`from_runner_args` keeps the STADI keys (refusing misspelled ones), and constructing a runner
model with a STADI config builds its STADI form.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from stadi_xdit.config import SETTINGS, shown_key
from stadi_xdit.runtime import heartbeat
from stadi_xdit.topology import REFUSED_WITH_STADI, STADI_SLOT

# Capabilities of xDiT's runner models that STADI's own loop cannot combine with: the refused degrees
# (but STADI's own slot, which a STADI run fills) and these features.
_FEATURES_NOT_WITH_STADI = ("use_fp8_comms", "use_hybrid_attn_schedule",
                            "use_hybrid_gemm_schedule", "supports_sparse_attention_backends",
                            "supports_sparge_attention_backends")
_NOT_WITH_STADI = (*(name for name in REFUSED_WITH_STADI if name != STADI_SLOT), *_FEATURES_NOT_WITH_STADI)

# Keys a runner config dict may carry for STADI: every StadiArgs field.
STADI_RUNNER_KEYS = frozenset({meta["flag"].removeprefix("--") for meta in SETTINGS.values()}
                              | {"stadi_config_file"})


def check_runner_keys(config: dict[str, Any]) -> None:
    """A misspelled STADI key in a runner config dict is refused, not silently dropped."""
    unknown = sorted(shown_key(k) for k in config
                     if isinstance(k, str) and k.startswith("stadi_") and k not in STADI_RUNNER_KEYS)
    if unknown:
        raise ValueError(f"unknown STADI key(s) in the runner config: {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(STADI_RUNNER_KEYS))})")
    for key in config:
        meant = near_stadi_key(key)
        if meant is not None:
            raise ValueError(f"runner config key {key!r} is not a STADI key; did you mean {meant!r}? "
                             "(keys are case- and space-sensitive)")


def near_stadi_key(key: Any) -> str | None:
    """The STADI key that `key` only misses by case or surrounding whitespace ('STADI_speeds',
    'use_stadi '), which xDiT would drop silently; None for exact or unrelated keys."""
    if not isinstance(key, str) or key in STADI_RUNNER_KEYS:
        return None
    folded = key.strip().lower()
    return next((known for known in sorted(STADI_RUNNER_KEYS) if known.lower() == folded), None)


def with_model_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with the runner model's default size and steps where the user gave none.

    The runner fills these from the model's `default_input_values` only after building the model;
    STADI checks the shape (token rows >= ranks, warmup < steps) before any process starts.
    """
    from xfuser.model_executor.models.runner_models.base_model import MODEL_REGISTRY

    model = MODEL_REGISTRY.get(config.get("model"))
    defaults = getattr(model, "default_input_values", None)
    filled = dict(config)
    for key in ("height", "width", "num_inference_steps"):
        if filled.get(key) is None and getattr(defaults, key, None) is not None:
            filled[key] = getattr(defaults, key)
    return filled


def runner_twin(model_name: str | None) -> type | None:
    """The STADI twin serving registered runner model `model_name`, or None."""
    from xfuser.model_executor.models.runner_models.base_model import MODEL_REGISTRY

    from stadi_xdit.registry import twin_for_runner_model

    model = MODEL_REGISTRY.get(model_name)
    return None if model is None else twin_for_runner_model(model.__name__)


def runner_config_uses_stadi(config: Any) -> bool:
    """Whether xDiT's runner config (its dict as a namespace) turns STADI on."""
    return bool(getattr(config, "use_stadi", False))


def supported_runner_models() -> list[str]:
    """Registry names (as `xdit --model` takes them) whose model class has a STADI family."""
    from xfuser.model_executor.models.runner_models.base_model import MODEL_REGISTRY

    from stadi_xdit.registry import twin_for_runner_model

    return sorted(name for name, cls in MODEL_REGISTRY.items() if twin_for_runner_model(cls.__name__) is not None)


def as_stadi_pipeline(pipe: Any, engine_config: Any) -> Any:
    """The STADI twin of what a runner model's `_load_model` returned."""
    from stadi_xdit.registry import twin_for_diffusers
    from stadi_xdit.xdit.pipelines import StadiPipelineMixin

    if isinstance(pipe, StadiPipelineMixin):  # built through an xFuser wrapper: the CLI hook made the twin
        return pipe
    pipeline = getattr(pipe, "module", pipe)  # an xFuser wrapper without STADI: take its diffusers pipeline
    twin = twin_for_diffusers(type(pipeline).__name__)
    if twin is None:
        raise ValueError(f"--use_stadi has no STADI family for {type(pipeline).__name__}")
    stadi = twin(pipeline, engine_config)
    # The model's `_run_pipe` was written for a diffusers pipeline, which returns an output on every rank.
    stadi.outputs_on_every_rank = pipeline is pipe
    return stadi


def stadi_runner_model(model_cls: type, model_name: str | None = None) -> type:
    """The STADI form of runner model class `model_cls` (registered as `model_name`, as the user typed
    it), or a one-line error naming the supported models."""
    from stadi_xdit.registry import twin_for_runner_model

    if twin_for_runner_model(model_cls.__name__) is None:
        name = model_name or getattr(getattr(model_cls, "settings", None), "model_name", model_cls.__name__)
        raise ValueError(f"--use_stadi does not support --model {name}; STADI serves "
                         f"{', '.join(supported_runner_models())}")
    return _stadi_form(model_cls)


def stadi_output_name(model: Any, input_args: dict[str, Any]) -> str:
    """The runner's output name for a STADI run: the strategy, its mode, `_tc` with --use_torch_compile, the
    --cache_method and the process count where xDiT's `get_output_name` has `u<ulysses>r<ring>_tc_<compile>`, so a STADI run and a
    plain run into one --output_directory never write the same file."""
    # The pipeline's topology where it has one: on nodes of different sizes it may have grouped them itself.
    topology = getattr(getattr(model, "pipe", None), "topology", None) or model.config.topology
    strategy = model.config.stadi.output_label(model.config.use_torch_compile, topology)
    if model.config.cache_method:  # a cached run's image differs: it keeps its own name
        strategy += f"_{model.config.cache_method}"
    ranks = model.config.topology.world_size  # the launch `validate` checked the flags against
    name = f"{model.settings.output_name}_{strategy}_n{ranks}_{input_args['height']}x{input_args['width']}"
    return f"{name}_{model.config.task}" if model.config.task else name


def save_runner_output(model: Any, output: Any) -> None:
    """xDiT's `xFuserModel.save_output` (same names, same folder), but every file is written
    atomically, and a result that cannot be saved there (a full disk, the folder removed mid-run)
    is saved in the launch folder or the system temp folder instead, with one line saying where."""
    import os

    from xfuser.core.utils.runner_utils import log

    from stadi_xdit.paths import save_with_fallback

    heartbeat.phase("save")
    lost = 0
    for index, (item, pipe_args) in enumerate(output.get_outputs()):
        name = model.get_output_name(pipe_args)
        if output.images:
            path, what = os.path.join(model.config.output_directory, f"{name}_{index}.png"), "image"
            saved = save_with_fallback(path, lambda temp, image=item: image.save(temp, format="PNG"), what)
        else:
            # xDiT's own writer (its module's name), as its save_output calls it.
            from xfuser.model_executor.models.runner_models.base_model import export_to_video

            path, what = os.path.join(model.config.output_directory, f"{name}_{index}.mp4"), "video"
            saved = save_with_fallback(path, lambda temp, video=item: export_to_video(video, str(temp),
                                                                                         fps=model.settings.fps), what)
        if saved is None:
            lost += 1
        else:
            log(f"Output {what} saved to {saved}")
    if not output.images and not output.videos:
        raise NotImplementedError("No output to save.")
    heartbeat.phase("cleanup")
    if lost:
        raise SystemExit(1)  # the line saying why was printed; the launch must not end with status 0


def save_runner_timings(model: Any, timings: list) -> None:
    """xDiT's `save_timings`, written atomically (a lost timings file is only warned about)."""
    import json
    import os

    from stadi_xdit.paths import save_with_fallback

    path = os.path.join(model.config.output_directory, "timings.json")
    text = json.dumps(timings, indent=2)
    save_with_fallback(path, lambda temp: temp.write_text(text), "timings")


@functools.cache
def _stadi_form(model_cls: type) -> type:
    from stadi_xdit.registry import twin_for_runner_model

    # A family that runs Ulysses inside STADI groups keeps the model's own Ulysses capability.
    kept = ("ulysses_degree",) if getattr(twin_for_runner_model(model_cls.__name__), "ulysses_groups", False) else ()
    capabilities = dataclasses.replace(model_cls.capabilities,
                                       **dict.fromkeys((name for name in _NOT_WITH_STADI if name not in kept), False))

    def initialize(self, input_args):
        heartbeat.phase("process-group")  # xDiT creates its world group first, then loads the model
        return model_cls.initialize(self, input_args)

    def _load_model(self):
        heartbeat.phase("load")
        # Told before the model's own loading code builds anything: a twin built there through an xFuser
        # wrapper (SD3.5) must already save on the runner's last process and leave it the VAE.
        self.engine_config = dataclasses.replace(self.engine_config, served_by_runner=True)
        pipe = as_stadi_pipeline(model_cls._load_model(self), self.engine_config)
        heartbeat.phase("setup")  # xDiT's runtime state and model-parallel groups, then the run
        return pipe

    def _compile_model(self, input_args):
        # xDiT compiles the transformer (its blocks under caching) and runs a short warmup call. Under STADI the
        # twin compiles each block's forward, in the mode this model picks (without CUDA graphs), and the warmup
        # call runs STADI's warmup and displaced steps, so the timed calls compile nothing; it is not measured
        # as this rank's speed. No compute/comm overlap passes: no collective runs inside a compiled graph.
        import copy

        self.pipe.compile_transformer(self._get_compile_mode())
        compile_args = copy.deepcopy(input_args)
        compile_args["num_inference_steps"] = self.pipe.compile_warmup_steps(input_args["num_inference_steps"])
        with self.pipe.compile_warmup():
            self._run_compile_warmup(compile_args)

    def _apply_step_cache(self):
        # xDiT applies --cache_method to the (compiled) transformer; STADI's loop then steers it per rank.
        # cache-dit's engine (dbcache; fbcache where the model's settings name it) is applied here, from the
        # same settings, without xDiT's agreement of all ranks on each decision (`xdit/step_cache.py`).
        from stadi_xdit.xdit.step_cache import apply_cache_dit, cache_dit_settings

        settings = cache_dit_settings(self.settings.step_cache_config, self.config.cache_method)
        if settings is not None:
            apply_cache_dit(self.pipe, self.pipe.module.transformer, settings, self.config.num_inference_steps,
                            self.config.cache_config)
        else:
            model_cls._apply_step_cache(self)
        self.pipe.attach_step_cache()

    return type(f"Stadi{model_cls.__name__}", (model_cls,), {
        "__module__": __name__, "__doc__": f"{model_cls.__name__} under STADI (pipeline wrapped into its twin).",
        "capabilities": capabilities, "initialize": initialize, "_load_model": _load_model,
        "_compile_model": _compile_model, "_apply_step_cache": _apply_step_cache,
        "get_output_name": stadi_output_name, "save_output": save_runner_output, "save_timings": save_runner_timings,
        "__stadi_runner_model__": True})
