"""Train the toy DiT (`stadi_xdit.toy.model`) on the procedural data set (`stadi_xdit.toy.data`).

    python scripts/train_toy_dit.py            # the shipped run: ~31 min on the 2-core dev machine
    python scripts/train_toy_dit.py --steps 40 --out /tmp/toy/toy_dit.safetensors   # a smoke run, all in /tmp/toy

Seeded and CPU-only. Epsilon-prediction DDPM loss on the noise schedule of the pipeline's own
scheduler (its ``alphas_cumprod``: linear betas 1e-4..0.02 over 1000 steps), with Min-SNR-gamma loss
weights; AdamW with linear warm-up then cosine decay to 10 %; 10 % of captions replaced by the null
embedding (classifier-free guidance); an EMA of the weights, which is what gets saved.

Writes the weights (float32 safetensors, ``--out``), a json next to them (config, steps, loss, wall
time, seed, versions, the sampled coherence metrics of the trained and of the untrained model), the
loss plot (``--loss-plot``) and a grid of samples (``--samples-plot``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import time
from pathlib import Path

import torch

from stadi_xdit.cli_errors import OneLineArgumentParser
from stadi_xdit.paths import is_inside, is_same_file, output_file_problem, save_figure, save_with_fallback
from stadi_xdit.toy import data, metrics, model

REPO = Path(__file__).resolve().parents[1]

# Measured 0.91 s per step at batch 32 (0.47 s at batch 16) with the 2 cores of the dev machine to
# itself (float32, 2 threads): 2000 steps are ~30 min of training, plus ~0.5 min of start-up, sampling
# and plots: about 31 min in all.
DEFAULT_STEPS = 2000
DEFAULT_BATCH = 32
DEFAULT_LR = 5e-4


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineArgumentParser(prog="train_toy_dit.py", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="images per step")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak (cosine)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights; 0 saves the raw weights")
    p.add_argument("--class-dropout", type=float, default=0.1, help="fraction of captions replaced by the null one")
    p.add_argument("--min-snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting; 0 for plain MSE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=model.WEIGHTS_PATH, help="weights (.safetensors); json next to it")
    p.add_argument("--loss-plot", type=str, default=None,
                   help="default: docs/img/toy_train_loss.png with the default --out, else next to --out; "
                        "empty string: none")
    p.add_argument("--samples-plot", type=str, default=None,
                   help="grid of samples after training; default: docs/img/toy_train_samples.png with the default "
                        "--out, else next to --out; empty string: none")
    p.add_argument("--eval-samples", type=int, default=24,
                   help="images sampled after training for the coherence metrics (0: skip)")
    p.add_argument("--eval-steps", type=int, default=model.DEFAULT_STEPS)
    p.add_argument("--eval-guidance", type=float, default=model.DEFAULT_GUIDANCE)
    p.add_argument("--time-budget-min", type=float, default=50.0,
                   help="stop training early once this many minutes have passed (recorded in the json)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    for flag, value, ok, bounds in (
            ("--steps", args.steps, args.steps >= 1, ">= 1"), ("--batch", args.batch, args.batch >= 1, ">= 1"),
            ("--lr", args.lr, 0 < args.lr < math.inf, "> 0 and finite"),
            ("--warmup", args.warmup, args.warmup >= 0, ">= 0"),
            ("--min-lr-ratio", args.min_lr_ratio, 0 <= args.min_lr_ratio <= 1, "in [0, 1]"),
            ("--weight-decay", args.weight_decay, 0 <= args.weight_decay < math.inf, ">= 0 and finite"),
            ("--grad-clip", args.grad_clip, 0 < args.grad_clip < math.inf, "> 0 and finite"),
            ("--ema", args.ema, 0 <= args.ema < 1, "in [0, 1)"),
            ("--class-dropout", args.class_dropout, 0 <= args.class_dropout < 1, "in [0, 1)"),
            ("--min-snr-gamma", args.min_snr_gamma, 0 <= args.min_snr_gamma < math.inf, ">= 0 and finite"),
            ("--threads", args.threads, 1 <= args.threads <= 1024, "in [1, 1024]"),
            ("--seed", args.seed, 0 <= args.seed <= 2**63 - 1, "in [0, 2**63 - 1] (torch's generator seed)"),
            ("--eval-samples", args.eval_samples, args.eval_samples >= 0, ">= 0"),
            # One step leaves the multistep solver's final-step branch without a history: IndexError.
            ("--eval-steps", args.eval_steps, 2 <= args.eval_steps <= 1000, "in [2, 1000]"),
            ("--eval-guidance", args.eval_guidance, 0 <= args.eval_guidance < math.inf, ">= 0 and finite"),
            ("--time-budget-min", args.time_budget_min, 0 < args.time_budget_min < math.inf, "> 0 and finite")):
        if not ok:  # NaN fails every comparison, so it lands here too
            p.error(f"argument {flag}: must be {bounds}, got {value!r}")
    problem = output_file_problem(args.out)
    if problem:
        p.error(f"argument --out: {problem}")
    problem = out_collision(args.out)
    if problem:
        p.error(f"argument --out: {problem}")
    # Plots go to the docs only with the shipped weights; a run elsewhere keeps them beside its weights.
    plots = REPO / "docs" / "img" if args.out.resolve() == model.WEIGHTS_PATH.resolve() else args.out.parent
    for attr, name in (("loss_plot", "toy_train_loss.png"), ("samples_plot", "toy_train_samples.png")):
        value = getattr(args, attr)
        setattr(args, attr, plots / name if value is None else (Path(value) if value else None))
        problem = getattr(args, attr) and output_file_problem(getattr(args, attr))
        if not problem and getattr(args, attr) is not None and any(
                is_same_file(getattr(args, attr), written) for written in outputs_of(args.out)):
            problem = f"{getattr(args, attr)} is one of the files written for --out {args.out}"
        if problem:
            p.error(f"argument --{attr.replace('_', '-')}: {problem}")
    return args


def outputs_of(out: Path) -> tuple[Path, Path, Path]:
    """What a run with `--out` writes: the weights, their json, and the reference latents beside them."""
    return out, out.with_suffix(".json"), out.with_name(model.REFERENCE_PATH.name)


def out_collision(out: Path) -> str | None:
    """Why `--out` would make the run overwrite its own outputs or the shipped reference (None: fine).

    `--out w.json` wrote the weights, then the run's json over them; `--out .../toy_reference.safetensors`
    wrote the weights, then the reference latents over them, and exited 0.
    """
    if out.suffix != ".safetensors":
        return f"must be a .safetensors file (its json is written beside it), got {out}"
    weights, info, reference = outputs_of(out)
    if is_same_file(weights, reference):
        return (f"{out} is the name of the reference latents written beside the weights; name the weights "
                "differently, e.g. toy_dit.safetensors")
    for shipped in (model.REFERENCE_PATH, model.INFO_PATH):
        if is_same_file(weights, shipped):
            return f"{out} is the shipped {shipped.name}, not a weights file"
    if out.resolve() != model.WEIGHTS_PATH.resolve() and any(
            is_inside(path, model.WEIGHTS_DIR) for path in (weights, info, reference)):
        return (f"{out} would write beside the shipped weights in {model.WEIGHTS_DIR} (their json and reference "
                "would be replaced); use the default --out to retrain them, or another folder")
    return None


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to ``--lr``, then cosine decay to ``--lr * --min-lr-ratio`` at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    span = max(args.steps - args.warmup, 1)
    progress = min((step - args.warmup) / span, 1.0)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), live.parameters()):
        e.lerp_(p, 1.0 - decay)


def smoothed(values: list[float], window: int = 100) -> float:
    tail = values[-window:]
    return float(sum(tail) / len(tail)) if tail else float("nan")


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transformer = model.build_toy_transformer(args.seed)
    model.init_pixart_weights_(transformer)
    transformer.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False) if args.ema > 0 else None
    alphas_cumprod = model.build_toy_scheduler().alphas_cumprod.float()  # the pipeline's noise schedule
    timesteps = alphas_cumprod.shape[0]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = (snr.clamp(max=args.min_snr_gamma) / snr) if args.min_snr_gamma > 0 else torch.ones_like(snr)

    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed + 1)  # data, timesteps, noise, caption dropout
    null = data.null_embeds(args.batch)
    mask = data.caption_mask(args.batch)
    added = {"resolution": None, "aspect_ratio": None}

    losses: list[float] = []  # the optimised (Min-SNR weighted) loss
    mses: list[float] = []  # plain epsilon MSE
    start = time.perf_counter()
    cpu_start = time.process_time()
    budget_s = args.time_budget_min * 60 if args.time_budget_min and args.time_budget_min > 0 else math.inf
    stopped_early = False
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, desc="train toy DiT", unit="step", mininterval=1.0, dynamic_ncols=True)
    for step in range(args.steps):
        if time.perf_counter() - start > budget_s:
            stopped_early = True
            break
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0, class_ids = data.sample_batch(generator, args.batch)
        embeds = data.caption_embeds(class_ids)
        drop = torch.rand(args.batch, generator=generator) < args.class_dropout
        embeds = torch.where(drop[:, None, None], null, embeds)
        t = torch.randint(0, timesteps, (args.batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = transformer(noisy, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t,
                           added_cond_kwargs=added, return_dict=False)[0]
        per_image = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (loss_weight[t] * per_image).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), args.grad_clip)
        optimizer.step()
        if ema is not None:
            ema_update(ema, transformer, min(args.ema, (1 + step) / (10 + step)))
        losses.append(loss.item())
        mses.append(per_image.detach().mean().item())
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{smoothed(losses, 50):.4f}", mse=f"{smoothed(mses, 50):.4f}", lr=f"{lr:.1e}")
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    steps_done = len(losses)
    return {"transformer": (ema if ema is not None else transformer).eval(), "losses": losses, "mses": mses,
            "steps_done": steps_done, "stopped_early": stopped_early, "train_s": train_s, "cpu_s": cpu_s}


def save_loss_plot(path: Path, losses: list[float], mses: list[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def running(values: list[float], window: int = 50) -> list[float]:
        out, total = [], 0.0
        for i, v in enumerate(values):
            total += v
            if i >= window:
                total -= values[i - window]
            out.append(total / min(i + 1, window))
        return out

    steps = range(1, len(losses) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, mses, color="tab:blue", alpha=0.2, linewidth=0.6)
    ax.plot(steps, running(mses), color="tab:blue", label="epsilon MSE (50-step mean)")
    ax.plot(steps, running(losses), color="tab:orange", label="Min-SNR weighted loss, optimised (50-step mean)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, "loss plot")
    plt.close(fig)


@torch.no_grad()
def sample(transformer, class_ids: list[int], args: argparse.Namespace, seed: int = 0) -> torch.Tensor:
    pipe = model.build_toy_pipeline(transformer)
    pipe.set_progress_bar_config(disable=True)
    kwargs = model.toy_call_kwargs(class_ids, seed=seed, steps=args.eval_steps, guidance_scale=args.eval_guidance)
    return pipe(**kwargs).images


def evaluate(trained, args: argparse.Namespace) -> tuple[dict, torch.Tensor, torch.Tensor, list[int]]:
    class_ids = [i % data.NUM_CLASSES for i in range(args.eval_samples)]
    trained_latents = sample(trained, class_ids, args)
    untrained_latents = sample(model.build_toy_transformer(args.seed).eval(), class_ids, args)
    result = {
        "samples": args.eval_samples, "steps": args.eval_steps, "guidance_scale": args.eval_guidance,
        "sample_seed": 0,
        "trained": metrics.coherence_metrics(trained_latents, class_ids),
        "random_weights": metrics.coherence_metrics(untrained_latents, class_ids),
        "ground_truth": metrics.ground_truth_metrics(256, seed=0),
    }
    return result, trained_latents, untrained_latents, class_ids


def main(argv=None) -> int:
    args = parse_args(argv)
    import diffusers
    from safetensors.torch import save_file

    wall_start = time.perf_counter()
    run = train(args)
    transformer = run["transformer"]
    state = {k: v.detach().float().contiguous() for k, v in transformer.state_dict().items()}
    # The weights first (hours of training), atomically, elsewhere if --out fails now: then the rest.
    out = save_with_fallback(args.out, lambda temp: save_file(state, str(temp), metadata={
        "format": "pt", "model": "stadi_xdit toy DiT (PixArtTransformer2DModel)"}), "trained weights")
    if out is None:
        return 1
    params = sum(v.numel() for v in state.values())

    steps_done = run["steps_done"]
    final_loss = smoothed(run["losses"])
    final_mse = smoothed(run["mses"])
    title = (f"toy DiT: {steps_done} steps x batch {args.batch}, {run['train_s'] / 60:.1f} min on "
             f"{args.threads} threads; final eps-MSE {final_mse:.4f} (last 100 steps)")
    if args.loss_plot is not None:
        save_loss_plot(args.loss_plot, run["losses"], run["mses"], title)

    evaluation = None
    if args.eval_samples > 0:
        eval_start = time.perf_counter()
        evaluation, trained_latents, untrained_latents, class_ids = evaluate(transformer, args)
        evaluation["wall_s"] = round(time.perf_counter() - eval_start, 1)
        if args.samples_plot is not None:
            from stadi_xdit.toy import viz

            reference, _ = data.sample_batch(0, len(class_ids), torch.tensor(class_ids))
            n = min(12, len(class_ids))
            viz.save_image_grid(args.samples_plot, [reference[:n], trained_latents[:n], untrained_latents[:n]],
                                labels=["data", "trained", "random\nweights"],
                                col_labels=[data.CLASS_NAMES[c] for c in class_ids[:n]],
                                title=f"toy DiT samples: {args.eval_steps} DPM-Solver steps, CFG "
                                      f"{args.eval_guidance:g} (seed 0)")

    info = {
        "model": "PixArtTransformer2DModel (PixArt-alpha), trained on stadi_xdit.toy.data latents",
        "config": model.TOY_CONFIG,
        "parameters": params,
        "weights_dtype": "float32",
        "weights_bytes": out.stat().st_size,
        "weights_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "weights_are_ema": args.ema > 0,
        "steps": steps_done,
        "steps_planned": args.steps,
        "stopped_early": run["stopped_early"],
        "time_budget_min": args.time_budget_min,
        "batch": args.batch,
        "lr": args.lr,
        "warmup": args.warmup,
        "min_lr_ratio": args.min_lr_ratio,
        "weight_decay": args.weight_decay,
        "grad_clip": args.grad_clip,
        "ema": args.ema,
        "class_dropout": args.class_dropout,
        "min_snr_gamma": args.min_snr_gamma,
        "seed": args.seed,
        "threads": args.threads,
        "final_loss_smoothed": final_loss,
        "final_eps_mse_smoothed": final_mse,
        "smoothing": "mean of the last 100 steps",
        "train_wall_s": round(run["train_s"], 1),
        "s_per_step": round(run["train_s"] / max(steps_done, 1), 4),
        # CPU seconds (all threads) per step: ~threads x s_per_step when the run had the cores to itself.
        "cpu_s_per_step": round(run["cpu_s"] / max(steps_done, 1), 4),
        "total_wall_s": round(time.perf_counter() - wall_start, 1),
        "data": {"num_classes": data.NUM_CLASSES, "class_names": list(data.CLASS_NAMES),
                 "caption_tokens": data.CAPTION_TOKENS, "caption_channels": data.CAPTION_CHANNELS,
                 "caption_seed": data.CAPTION_SEED},
        "evaluation": evaluation,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    text = json.dumps(info, indent=2) + "\n"
    json_path = save_with_fallback(out.with_suffix(".json"), lambda temp: temp.write_text(text), "training json")
    reference = save_with_fallback(out.with_name(model.REFERENCE_PATH.name),
                                   lambda temp: model.write_reference(out, temp), "reference latents")
    print(f"wrote {out} ({info['weights_bytes'] / 1e6:.1f} MB, {params / 1e6:.2f} M params), {json_path} "
          f"and {reference}")
    print(f"{steps_done} steps in {run['train_s'] / 60:.1f} min ({info['s_per_step']:.3f} s/step, "
          f"{info['cpu_s_per_step']:.3f} CPU s/step)"
          f"{' (stopped early: time budget)' if run['stopped_early'] else ''}; "
          f"final loss {final_loss:.4f}, eps-MSE {final_mse:.4f}")
    if evaluation is not None:
        for name in ("trained", "random_weights", "ground_truth"):
            row = ", ".join(f"{k} {v:.3f}" for k, v in evaluation[name].items())
            print(f"  {name:>14}: {row}")
    return 0 if json_path and reference else 1


if __name__ == "__main__":
    raise SystemExit(main())
