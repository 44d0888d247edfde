"""A run's config: TrainConfig, the TOML/YAML files that set it, and the precedence between them.

Precedence: TrainConfig's defaults < the run's saved config (--resume) < a config file (--config) < the options
given. The resolved config is saved as config.yaml in the run folder (timm's args.yaml).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from bixt.data import DEFAULT_RECIPES, parse_spec
from bixt.train import rundir


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; the defaults train `bixt_digits` on digits to 98-99.7 % in 1-2 minutes."""

    model: str | None = None  # None: the data's default model (bixt.data.DEFAULT_MODELS)
    model_args: dict = field(default_factory=dict)  # overrides of the model's config, e.g. {dim: 128, depth: 6}
    data: str = "digits"
    epochs: int = 40
    batch_size: int = 64  # global: split evenly over the processes
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 3.0  # capped at half the run, so short runs still anneal
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0  # max gradient norm; None: no clipping
    amp: bool = False  # bf16 autocast on CUDA or a bf16-capable CPU (fp16 + loss scaling on CUDA without bf16)
    grad_checkpointing: bool = False  # recompute activations in the backward: less memory, same numbers
    compile: bool = False  # torch.compile the training step (bixt.nn.compile): the first step compiles
    shard_tokens: int = 1  # processes sharing each sample's tokens (torchrun; bixt.nn.sharding)
    augment: bool = True
    train_samples: int | None = None  # a fixed subset of the training split (the same for every seed); None: all
    test_samples: int | None = None  # likewise of the test split
    device: str | None = None  # cpu | cuda; None: cuda when available
    seed: int = 0
    workers: int | None = None  # DataLoader workers; None: what the data needs (0 for in-memory sets)
    out: str | None = None  # run folder; None: runs/<model>-<data>-<time>

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))
        _check_finite(self)
        checks = [(self.epochs >= 1, "--epochs must be >= 1"), (self.batch_size >= 1, "--batch-size must be >= 1"),
                  (self.lr > 0, "--lr must be > 0"), (self.min_lr >= 0, "min_lr must be >= 0"),
                  (self.weight_decay >= 0, "--weight-decay must be >= 0"),
                  (self.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
                  (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
                  (self.clip_grad is None or self.clip_grad > 0, "clip_grad must be > 0 (or null for none)"),
                  (self.seed >= 0, "--seed must be >= 0"),
                  (self.shard_tokens >= 1, "--shard-tokens must be >= 1"),
                  (self.workers is None or self.workers >= 0, "workers must be >= 0"),
                  (self.train_samples is None or self.train_samples >= 1, "--train-samples must be >= 1"),
                  (self.test_samples is None or self.test_samples >= 1, "--test-samples must be >= 1")]
        for ok, message in checks:
            if not ok:
                name = message.split()[0].lstrip("-").replace("-", "_")
                raise ValueError(f"{message}, got {getattr(self, name)}")
        if self.compile and self.shard_tokens > 1:  # the sharded attention's collectives are not checked compiled
            raise ValueError(f"--compile does not run with --shard-tokens {self.shard_tokens}: drop one of them")
        parse_spec(self.data)

    @property
    def title(self) -> str:
        """How progress bars and plots name the run."""
        return f"{self.model} on {self.data}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_finite(cfg: TrainConfig) -> None:
    """Every float option finite: inf passes the range checks (inf > 0) and trains to NaN weights saved as best."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            option = f"--{f.name.replace('_', '-')}" if f.name in CLI_FLOATS else f.name
            fix = "; null for no clipping" if f.name == "clip_grad" else ""
            raise ValueError(f"{option} must be a finite number, got {value}: give a finite value (the default is "
                             f"{f.default}{fix})")


CLI_FLOATS = ("lr", "weight_decay", "warmup_epochs")  # the float options `bixt train` has flags for
FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# Options that change no number a run computes: they may differ when resuming (gradient checkpointing trades
# memory for a second forward of the same numbers, so a run may switch it on when it outgrows the memory; compiling
# changes the kernels, not the computation, up to float rounding).
RESUME_FREE = ("device", "workers", "out", "grad_checkpointing", "compile")
_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _coerce(f: dataclasses.Field, value):
    """Config-file values arrive as YAML/TOML scalars: check (and widen int -> float) against the field type."""
    kinds = [t.strip() for t in str(f.type).split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ValueError(f"{f.name} cannot be null")
    if f.name == "model_args":
        if not isinstance(value, dict):
            raise ValueError(f"model_args must be a mapping of model config fields, got {value!r}")
        return dict(value)
    for kind in kinds:
        t = _TYPES.get(kind)
        if t is bool and isinstance(value, bool) or t in (int, str) and type(value) is t:
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    raise ValueError(f"{f.name} must be {' or '.join(kinds)}, got {value!r}")


def read_config_file(path: str | Path) -> dict:
    """A TOML (.toml) or YAML (.yaml/.yml) file of TrainConfig fields ('-' and '_' both accepted in keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist: check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not UTF-8 text: give a TOML or YAML file") from None
    if path.suffix == ".toml":
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML ({e})") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML ({' '.join(str(e).split())})") from None
    else:
        raise ValueError(f"config file {path} must end in .toml, .yaml or .yml")
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping of options, got a {type(raw).__name__}")
    options = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}; valid are {', '.join(FIELDS)}")
    return options


def find_run(resume: str | Path) -> Path:
    """A run folder from --resume DIR or a file inside it (last.safetensors, last.state.pt, ...)."""
    path = Path(resume)
    run = path if path.is_dir() else path.parent
    if not path.exists():
        raise FileNotFoundError(f"--resume {path} does not exist: give a run folder (with {rundir.CONFIG})")
    if not (run / rundir.CONFIG).is_file():
        raise FileNotFoundError(f"{run} is not a bixt run folder: {rundir.CONFIG} is missing there")
    if not (run / rundir.STATE).is_file():  # the run stopped before its first checkpoint: nothing to go on from
        raise FileNotFoundError(f"{run / rundir.STATE} does not exist, so there is nothing to resume: start a new "
                                f"run with --out (a new folder, or delete {run} first), or point --resume at a run "
                                "folder with a checkpoint")
    return run


def data_recipe(data: str) -> dict:
    """The training options the data kind defaults (bixt.data.Source.recipe), under any given."""
    return dict(DEFAULT_RECIPES[parse_spec(data).kind])


def resolve_config(options: dict | None = None, config_file: str | Path | None = None,
                   resume: str | Path | None = None) -> TrainConfig:
    """The run's config: defaults < the data kind's (data_recipe) < saved run config (resume) < config file <
    `options` (None values ignored).

    Resuming with an option that would change the computation is refused: the run would no longer be exact.
    """
    options = {k.replace("-", "_"): v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; valid are {', '.join(FIELDS)}")
    from_file = read_config_file(config_file) if config_file else {}
    given = {**from_file, **options}
    if "model_args" in from_file and "model_args" in options:  # the command line's model_args add to the file's
        given["model_args"] = {**from_file["model_args"], **options["model_args"]}
    if resume is None:
        return TrainConfig(**{**data_recipe(given.get("data", TrainConfig.data)), **given})
    run = find_run(resume)
    if given.get("out") is not None and Path(given["out"]).resolve() != run.resolve():
        raise ValueError(f"--out {given['out']} and --resume {resume} name different runs: a resumed run stays in "
                         f"{run}")
    saved = read_config_file(run / rundir.CONFIG)
    changed = sorted(k for k, v in given.items() if k not in RESUME_FREE and saved.get(k) != v
                     and not (k == "model_args" and {**saved.get(k, {}), **v} == saved.get(k, {})))
    if changed:
        raise ValueError(f"--resume continues {run} as it was configured; {', '.join(changed)} differ(s) from its "
                         f"{rundir.CONFIG}: start a new run (--out) to change them")
    return TrainConfig(**{**saved, **{k: v for k, v in given.items() if k in RESUME_FREE}, "out": str(run)})
