"""`bixt train` and `bixt eval`: thin wrappers around bixt.train.train and bixt.train.eval.evaluate_checkpoint."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand

from bixt_cli.app import MODEL_ARG_HELP, app, console, err_console, parse_model_args, print_error, user_errors


class _TrainCommand(TyperCommand):
    """Lists the data kinds in --data's help when the help is shown: bixt.data imports torch, which would slow
    every `bixt` command if it were read at start-up."""

    def format_help(self, ctx, formatter):
        from bixt.data import SPECS

        for param in self.params:
            if param.name == "data":  # a space after each comma lets a narrow terminal wrap the long specs
                param.help = f"{' | '.join(s.replace(',', ', ') for s in SPECS)} (default digits)."
        return super().format_help(ctx, formatter)


@app.command("train", cls=_TrainCommand)
@user_errors
def train_command(
    model: str = typer.Option(None, help="Registered model (bixt models); default: the data's own (bixt_digits)."),
    data: str = typer.Option(None, help="A data spec (the kinds are listed when this help is shown)."),
    epochs: int = typer.Option(None, help="Epochs (default 40)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Global batch, split over the processes (default 64)."),
    lr: float = typer.Option(None, help="Peak AdamW learning rate (default 0.002)."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 0.05)."),
    warmup_epochs: float = typer.Option(None, "--warmup-epochs", help="Linear warm-up before the cosine (default 3)."),
    amp: bool = typer.Option(None, "--amp/--no-amp", help="bf16 autocast on CUDA or a bf16-capable CPU (fp16 with "
                                                           "loss scaling on CUDA without bf16)."),
    grad_checkpointing: bool = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing",
                                            help="Recompute activations in the backward: less memory, one more "
                                                 "forward per step, the same weights."),
    compile_: bool = typer.Option(None, "--compile/--no-compile",
                                  help="torch.compile the training step (inductor; on a CPU it needs g++): the "
                                       "first step compiles, its time reported apart (compile_s)."),
    shard_tokens: int = typer.Option(None, "--shard-tokens", metavar="P",
                                     help="Under torchrun: every P processes share each sample's tokens (BiXT; "
                                          "exact, for inputs too long for one device). Default 1."),
    train_samples: int = typer.Option(None, "--train-samples", metavar="N",
                                      help="Train on a fixed subset of N samples (the same for every seed; "
                                           "default: all)."),
    test_samples: int = typer.Option(None, "--test-samples", metavar="N",
                                     help="Evaluate on a fixed subset of N test samples (default: all)."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda when available)."),
    seed: int = typer.Option(None, help="Seed of weights, data order and augmentation (default 0)."),
    out: Path = typer.Option(None, help="Run folder (default runs/<model>-<data>-<time>); must be new or empty."),
    resume: Path = typer.Option(None, "--resume", metavar="DIR|CKPT",
                                help="Continue a run (its folder, or a checkpoint in it) exactly where it stopped."),
    config: Path = typer.Option(None, "--config", help="TOML or YAML file with any of these options (and "
                                                       "model_args: overrides of the model's config)."),
    model_arg: list[str] = typer.Option(None, "--model-arg", metavar="KEY=VALUE", help=MODEL_ARG_HELP),
):
    """Train a model; every epoch writes metrics.csv, curves.png and checkpoints to the run folder."""
    from bixt.train import TrainingDiverged, train

    options = {"model": model, "data": data, "epochs": epochs, "batch_size": batch_size, "lr": lr,
               "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "amp": amp,
               "grad_checkpointing": grad_checkpointing, "compile": compile_, "shard_tokens": shard_tokens,
               "train_samples": train_samples,
               "test_samples": test_samples, "device": device,
               "seed": seed, "out": None if out is None else str(out),
               "model_args": parse_model_args(model_arg) or None}
    try:
        result = train(options, config_file=config, resume=resume, console=err_console)
    except TrainingDiverged as e:
        print_error(str(e))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # a second Ctrl-C: abort without saving
        raise typer.Exit(130) from None
    if result.status == "interrupted":
        err_console.print(f"stopped by signal {result.signal}; checkpoint saved: resume with "
                          f"`bixt train --resume {result.run}`", highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(128 + result.signal)
    if not result.main:  # the other processes of a torchrun job
        return
    table = Table(title=escape(f"bixt train: {result.run}"), header_style="bold", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    last = result.last
    dense = last.get("test_miou") is not None
    if dense:  # per-token accuracy and mIoU; the best epoch is the best mIoU
        scores = [("best test mIoU", f"{100 * result.best_acc:.2f} % (epoch {result.best_epoch})"),
                  ("final test mIoU", f"{100 * last['test_miou']:.2f} %")]
        if last.get("test_instance_miou") is not None:
            scores.append(("final instance mIoU", f"{100 * last['test_instance_miou']:.2f} %"))
        scores.append(("final test acc (tokens)", f"{100 * last['test_acc']:.2f} %"))
    else:
        scores = [("best test acc", f"{100 * result.best_acc:.2f} % (epoch {result.best_epoch})"),
                  ("final test acc", f"{100 * last['test_acc']:.2f} %"),
                  ("final test top-5", f"{100 * last['test_top5']:.2f} %")]
    for key, value in [("epochs", result.epochs_done), ("parameters", f"{result.params:,}"), *scores,
                       ("final test loss", f"{last['test_loss']:.4f}"),
                       ("final train acc", f"{100 * last['train_acc']:.2f} %"),
                       ("time", f"{result.seconds:.1f} s"), ("train samples/s", f"{result.samples_per_s:,.0f}"),
                       *([("compile (first step)", f"{result.compile_s:.1f} s")] if result.compile_s is not None
                         else []),
                       ("run folder", str(result.run))]:
        table.add_row(key, escape(str(value)))  # the run folder is the user's path: printed literally
    console.print(table)


@app.command("eval")
@user_errors
def eval_command(
    checkpoint: Path = typer.Option(..., help="A run folder, its best/last.safetensors, or any weights file "
                                              "(the authors' model_best.pth.tar included)."),
    model: str = typer.Option(None, help="Registered model (default: the run's, or the one the weights fit)."),
    data: str = typer.Option(None, help="Data spec (default: the run's); ImageNet: imagefolder:PATH "
                                       "with PATH/val/<class>/."),
    batch_size: int = typer.Option(128, "--batch-size"),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda when available)."),
    workers: int = typer.Option(None, help="DataLoader workers (default: what the data needs)."),
    amp: bool = typer.Option(False, "--amp/--no-amp", help="bf16 autocast on CUDA or a bf16-capable CPU (fp16 on "
                                                            "CUDA without bf16)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout instead of the table."),
):
    """Top-1, top-5, loss and samples/s of a checkpoint on the test (val) split (dense tasks: mIoU, per-token
    accuracy and, for part segmentation, the instance mIoU)."""
    from bixt.train.eval import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, model, data, batch_size=batch_size, device=device, workers=workers,
                                 amp=amp)
    if as_json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    table = Table(title=escape(f"{result['model']} on {result['data']}"), caption=escape(result["checkpoint"]),
                  header_style="bold")  # data spec and path are the user's: printed literally
    if result.get("miou") is not None:  # a dense task
        scores = {"mIoU": result["miou"], "instance mIoU": result.get("instance_miou"),
                  "category mIoU": result.get("class_miou"), "acc (tokens)": result["top1"]}
    else:
        scores = {"top-1": result["top1"], "top-5": result["top5"]}
    scores = {k: f"{100 * v:.2f} %" for k, v in scores.items() if v is not None}
    cells = {**scores, "loss": f"{result['loss']:.4f}", "samples": f"{result['samples']:,}",
             "samples/s": f"{result['samples_per_s']:,.0f}"}
    for col in cells:
        table.add_column(col, justify="right")
    table.add_row(*cells.values())
    console.print(table)
